"""Shared fixtures: small configs that build in milliseconds on CPU."""
from __future__ import annotations

import os

import torch

# Triton kernels run in its interpreter on machines without a GPU; the variable must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megamem.config import load_config  # noqa: E402
from tests.paths import CONFIGS  # noqa: E402


@pytest.fixture
def tiny_config():
    """A MemoryFormer of the paper's shape family, shrunk: d = 64, K = 8, 2 blocks."""
    return load_config([CONFIGS / "cpu-smoke.yaml"], [
        "model.hidden_size=64", "model.num_heads=4", "model.num_layers=2", "model.seq_len=32", "model.vocab_size=97",
    ])
