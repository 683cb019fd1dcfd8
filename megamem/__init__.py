"""megamem: Megatron-style pretraining of MemoryFormer language models."""
__version__ = "0.1.0"
