"""A model trained here on the training tests' corpus, and the megamem command run in this process."""
from __future__ import annotations

import pytest

from megamem.cli.main import main
from tests.training.conftest import shards  # noqa: F401
from tests.training.runs import train


@pytest.fixture(scope="session")
def trained(shards, tmp_path_factory):  # noqa: F811
    """cpu-smoke after 6 steps, validated at the last."""
    run = tmp_path_factory.mktemp("run")
    train(shards, run, "train.eval_interval=1000", steps=6)
    return run


@pytest.fixture
def megamem(capsys):
    """The command in this process (no start-up per call): (exit status, stdout, stderr)."""
    def run(*argv: str) -> tuple[int, str, str]:
        status = main([*argv])
        out, err = capsys.readouterr()
        return status, out, err
    return run
