"""The runs several tests compare with, each trained once per session when a test first asks for it
(tests/training/runs.py says what each is)."""
from __future__ import annotations

import pytest

from tests.training.runs import EXACT, LAYOUT_STEPS, LAYOUTS, STRAIGHT, STRAIGHT_STEPS, STRAIGHTS, Runs


@pytest.fixture(scope="session")
def layout_runs(shards, shared) -> Runs:
    return Runs(shards, shared, LAYOUTS, EXACT, LAYOUT_STEPS)


@pytest.fixture(scope="session")
def straight_runs(shards, shared) -> Runs:
    return Runs(shards, shared, STRAIGHTS, STRAIGHT, STRAIGHT_STEPS)
