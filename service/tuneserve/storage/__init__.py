"""Storage backends for adapters, checkpoints and dataset snapshots: a local directory or S3."""
