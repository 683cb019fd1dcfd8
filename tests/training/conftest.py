"""The runs several tests compare with, each trained once per session when a test first asks for it
(tests/training/runs.py says what each is)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.paths import REPO
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
    TrainedRun,
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


@pytest.fixture(scope="session")
def statistics_runs(shards, shared):
    """The one-process run and the layouts of benchmarks/layout_spread.py, trained as that script trained them for
    its committed results (benchmarks/results/layout_spread.json)."""
    spec = importlib.util.spec_from_file_location("layout_spread", REPO / "benchmarks/layout_spread.py")
    layout_spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout_spread)
    steps = json.loads((REPO / "benchmarks/results/layout_spread.json").read_text())["steps"]
    specs = {**layout_spread.ORDERS, **layout_spread.LAYOUTS}

    def trained(name: str) -> TrainedRun:
        def make(run: Path) -> None:
            layout_spread.final_valid_loss(shards, run.parent, run.name, *specs[name], steps)

        return TrainedRun(shared.once(f"statistics-{name}", make)[0], "")

    return trained
