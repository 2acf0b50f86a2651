"""Fine-tuning on Ray Train with DeepSpeed: tokenisation, model building, the loop, the trainer, export."""
