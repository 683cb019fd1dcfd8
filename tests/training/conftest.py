"""The runs several tests compare with, each trained once per session when a test first asks for it
(tests/training/runs.py says what each is)."""
from __future__ import annotations

import pytest

from tests.training.runs import (
    EXACT,
    LAYOUT_STEPS,
    LAYOUTS,
    PRECISION_FAULT,
    PRECISION_STEPS,
    PRECISIONS,
    STRAIGHT,
    STRAIGHT_STEPS,
    STRAIGHTS,
    Runs,
)


@pytest.fixture(scope="session")
def layout_runs(shards, shared) -> Runs:
    return Runs(shards, shared, LAYOUTS, EXACT, LAYOUT_STEPS)


@pytest.fixture(scope="session")
def straight_runs(shards, shared) -> Runs:
    return Runs(shards, shared, STRAIGHTS, STRAIGHT, STRAIGHT_STEPS)


@pytest.fixture(scope="session")
def precision_runs(shards, shared) -> Runs:
    return Runs(shards, shared, PRECISIONS, STRAIGHT, PRECISION_STEPS, fault=PRECISION_FAULT)
