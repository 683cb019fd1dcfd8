"""Shared fixtures: small configs that build in milliseconds on CPU, the real corpus the runs train on, and the runs
and multi-rank launches several tests compare with, each made once per session when a test first asks for it
(tests/training/runs.py says what each run is, tests/parallel/worlds.py what each launch runs)."""
from __future__ import annotations

import importlib.util
import json
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
from tests.parallel.worlds import Worlds  # noqa: E402
from tests.paths import CONFIGS, REPO  # noqa: E402
from tests.shared import Shared  # noqa: E402
from tests.training.runs import (  # noqa: E402
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


def pytest_collection_modifyitems(items):
    """Slow tests first (stable otherwise): the pytest-xdist workers, handed one test at a time (scripts/test.sh),
    start the long runs early and fill the rest of the time with short tests, rather than end on one long test
    while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def worlds(shared) -> Worlds:
    """One launch of gloo ranks per world size for every multi-rank case (tests/parallel/worlds.py)."""
    return Worlds(shared)


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
    """The layouts of benchmarks/layout_spread.py, trained as that script trained them for its committed results
    (benchmarks/results/layout_spread.json)."""
    spec = importlib.util.spec_from_file_location("layout_spread", REPO / "benchmarks/layout_spread.py")
    layout_spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout_spread)
    steps = json.loads((REPO / "benchmarks/results/layout_spread.json").read_text())["steps"]
    specs = layout_spread.LAYOUTS

    def trained(name: str) -> TrainedRun:
        def make(run: Path) -> None:
            layout_spread.final_valid_loss(shards, run.parent, run.name, *specs[name], steps)

        return TrainedRun(shared.once(f"statistics-{name}", make)[0], "")

    return trained
