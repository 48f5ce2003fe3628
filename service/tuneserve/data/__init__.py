"""Datasets: reading and validating rows (no torch), and turning them into training examples."""
