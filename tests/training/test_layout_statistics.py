"""Under the numerics that ship (`model.kernel: auto`, `model.weighting: paper` with the tables at 24x the LR),
tp 2, pp 2 and dp 2 train like one process, statistically: their runs part from one process's after a few steps
(a rounding flips a hash code), so each is held, after 200 steps on real text, to the spread of one-process runs
that differ from each other only in the order of their sums. benchmarks/layout_spread.py measured that spread and
derived the bound (4 sqrt(2) times its standard deviation: the width of the difference of any two such runs, four
times) into benchmarks/results/layout_spread.json, with the one-process run's final loss. The three layouts are
trained again here, with the same settings, against those committed figures: a one-process run on another
machine, whose sums round otherwise, would be one more run of that spread, which the bound already allows for."""
from __future__ import annotations

import json

import pytest

from tests.paths import REPO
from tests.training.runs import losses

SPREAD = json.loads((REPO / "benchmarks/results/layout_spread.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_layouts_end_within_the_spread_of_summation_order(statistics_runs, straight_runs, layout):
    steps, one = SPREAD["steps"], SPREAD["orders"][SPREAD["reference"]]
    start = losses(straight_runs["one-process"].dir, "valid_loss")[0]       # the shipped model before training
    run = losses(statistics_runs(layout).dir, "valid_loss")
    assert run[0] == pytest.approx(start, rel=1e-6)          # the same model and validation batches at the start
    assert run[steps] < run[0] - 2, run                      # it learned
    assert abs(run[steps] - one) <= SPREAD["bound"], (layout, run[steps], one, SPREAD["bound"])
