"""What the training tests share: a real corpus, preprocessed once per module."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from megamem.data_tools.preprocess import PreprocessArgs, preprocess


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Real text: two packages of the Python standard library, byte-tokenized at cpu-smoke's seq_len; read-only,
    so one for the whole session."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("data") / "stdlib"
    preprocess(PreprocessArgs([str(stdlib / "json"), str(stdlib / "email")], str(out), seq_len=128, valid_fraction=0.1))
    return out
