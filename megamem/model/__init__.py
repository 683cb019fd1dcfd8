"""Plain-PyTorch models: no process groups, no I/O, no launch logic."""
from megamem.model.blocks import DenseBlock, MemoryFormerBlock
from megamem.model.build import build_model
from megamem.model.language_model import LanguageModel, lm_loss
from megamem.model.memory_layer import MemoryLayer

__all__ = ["DenseBlock", "LanguageModel", "MemoryFormerBlock", "MemoryLayer", "build_model", "lm_loss"]
