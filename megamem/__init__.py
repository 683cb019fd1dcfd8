"""megamem: Megatron-style pretraining of MemoryFormer language models."""
from megamem.build_tools import use_environment_ninja

__version__ = "0.1.0"

use_environment_ninja()
