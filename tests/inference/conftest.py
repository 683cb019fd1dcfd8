"""A model trained here on the training tests' corpus, its Hugging Face export, and the megamem command run in this
process."""
from __future__ import annotations

from pathlib import Path

import pytest

from megamem.cli.main import main


@pytest.fixture(scope="session")
def trained(straight_runs):
    """cpu-smoke as it ships after STRAIGHT_STEPS steps, validated at the last (tests/training/runs.py)."""
    return straight_runs["one-process"].dir


@pytest.fixture(scope="session")
def trained_hf(trained, shared):
    """`trained` as `megamem export --format hf` writes it (run in this process)."""
    def make(out: Path) -> None:
        assert main(["export", str(trained), "--format", "hf", "--output", str(out / "export")]) == 0

    return shared.once("trained-hf", make)[0] / "export"


@pytest.fixture
def megamem(capsys):
    """The command in this process (no start-up per call): (exit status, stdout, stderr)."""
    def run(*argv: str) -> tuple[int, str, str]:
        status = main([*argv])
        out, err = capsys.readouterr()
        return status, out, err
    return run
