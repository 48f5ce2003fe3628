"""Inference: the base model, loaded adapters and the decoding loop."""
