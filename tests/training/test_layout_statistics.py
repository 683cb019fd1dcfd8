"""Under the numerics that ship (`model.kernel: auto`, `model.weighting: l1`), tp 2, pp 2 and dp 2 train like one
process, statistically: their runs part from one process's after a few steps (a rounding flips a hash code), so
each is held, after 200 steps on real text, to the spread of one-process runs that differ from each other only in
the order of their sums. benchmarks/layout_spread.py measures that spread and derives the bound (4 sqrt(2) times
its standard deviation) into benchmarks/results/layout_spread.json; the three layouts and the one-process run are
trained again here, with the same settings, against it."""
from __future__ import annotations

import json

import pytest

from tests.paths import REPO
from tests.training.runs import losses

SPREAD = json.loads((REPO / "benchmarks/results/layout_spread.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_layouts_end_within_the_spread_of_summation_order(statistics_runs, layout):
    one, run = (losses(statistics_runs(name).dir, "valid_loss") for name in (SPREAD["reference"], layout))
    steps = SPREAD["steps"]
    assert run[0] == pytest.approx(one[0], rel=1e-6)       # the same model and validation batches at the start
    assert one[steps] < one[0] - 2 and run[steps] < run[0] - 2, (one, run)          # both learned
    assert abs(run[steps] - one[steps]) <= SPREAD["bound"], (layout, run[steps], one[steps], SPREAD["bound"])
