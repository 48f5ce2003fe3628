"""Training: the LoRA fine-tuning recipe. Knows nothing of gRPC, the queue or Prometheus."""
