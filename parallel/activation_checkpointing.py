"""Activation checkpointing of whole blocks, applied to a built model from outside.

Each block keeps only its input and recomputes its inside during backward. The
block's forward is wrapped in place, so parameter names (and checkpoints and
exports) are the same with and without it.
"""
from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> None:
    for block in model.blocks:
        plain = block.forward
        block.forward = lambda *args, _plain=plain: checkpoint(_plain, *args, use_reentrant=False)
