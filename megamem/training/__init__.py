"""Training: DeepSpeed engine, trainer loop, monitoring, checkpoints, export."""
