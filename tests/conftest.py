"""Shared fixtures: small configs that build in milliseconds on CPU, and the real corpus the runs train on."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

# Triton kernels run in its interpreter on machines without a GPU; the variable must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megamem.config import load_config  # noqa: E402
from megamem.data_tools.preprocess import PreprocessArgs, preprocess  # noqa: E402
from tests.paths import CONFIGS  # noqa: E402
from tests.shared import Shared  # noqa: E402


@pytest.fixture
def tiny_config():
    """A MemoryFormer of the paper's shape family, shrunk: d = 64, K = 8, 2 blocks."""
    return load_config([CONFIGS / "cpu-smoke.yaml"], [
        "model.hidden_size=64", "model.num_heads=4", "model.num_layers=2", "model.seq_len=32", "model.vocab_size=97",
    ])


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Shared:
    """What the session's tests share, made once whichever pytest-xdist worker asks first (tests/shared.py)."""
    return Shared(tmp_path_factory)


@pytest.fixture(scope="session")
def shards(shared):
    """Real text: two packages of the Python standard library, byte-tokenized at cpu-smoke's seq_len; read-only,
    so one for the whole session."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def make(out: Path) -> None:
        preprocess(PreprocessArgs([str(stdlib / "json"), str(stdlib / "email")], str(out), seq_len=128,
                                  valid_fraction=0.1))

    return shared.once("stdlib-shards", make)[0]
