"""Training: the run builder, DeepSpeed's engine, the trainer loop, monitoring, the rank supervisor."""
