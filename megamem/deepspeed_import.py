"""DeepSpeed, imported the one way megamem imports it.

DeepSpeed picks its accelerator when first imported; on a machine without CUDA
megamem names the CPU, so that DeepSpeed neither guesses (and warns that it did)
nor is imported with a choice a later import cannot change.
"""
from __future__ import annotations

import os


def import_deepspeed():
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed
