"""benchmarks/reproduce_small.py: --quick on the training tests' corpus writes results.json as documented and both
charts, and a second invocation reuses the finished runs and their test losses; the grid's rule (grow past an edge
while the best lies on it) on its own."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.paths import REPO

KEYS = {"valid_loss", "test_loss", "test_bits_per_byte", "tokens", "macs_per_token", "table_params", "other_params",
        "seconds", "table_lr_multiplier", "swept", "grid_extended_by", "best_inside_grid"}
VARIANTS = ("memoryformer_paper", "memoryformer_paper_tables", "memoryformer_l1", "dense")

spec = importlib.util.spec_from_file_location("reproduce_small", REPO / "benchmarks/reproduce_small.py")
reproduce_small = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce_small)


@pytest.mark.slow
def test_quick_reproduction_reports_each_variant_and_resumes(shards, tmp_path):
    command = [sys.executable, "benchmarks/reproduce_small.py", "--quick", "--data", str(shards), "--out",
               str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"memoryformer", *VARIANTS, "setup"} == set(results)
    for name in VARIANTS:
        entry = results[name]
        assert KEYS <= set(entry), name
        assert entry["tokens"] == results["dense"]["tokens"] == 20 * 8 * 128 and entry["valid_loss"] > 0
        assert entry["test_loss"] > 0 and entry["test_loss"] != entry["valid_loss"]       # another split
        assert len(entry["curve"]) >= 2 and entry["curve"][-1][1] == min(entry["lr_sweep"].values())
    assert results["memoryformer_paper_tables"]["lr"] == reproduce_small.BASE_LR
    assert results["memoryformer_paper_tables"]["table_lr_multiplier"] == 3.0
    for name in ("memoryformer_paper", "memoryformer_paper_tables", "memoryformer_l1"):
        entropy = results[name]["bucket_entropy"]
        assert len(entropy) == 3 and all(0 < e <= 1 for e in entropy), entropy        # qkv, ml1, ml2 of 1 block
        assert results[name]["table_params"] > 0 and results[name]["weighting"] in ("paper", "l1")
    assert results["dense"]["table_params"] == 0 and "bucket_entropy" not in results["dense"]
    assert results["memoryformer"]["variant"] == min(VARIANTS[:3], key=lambda v: results[v]["valid_loss"])
    setup = results["setup"]
    assert setup["files"] == 35 and setup["python"].count(".") == 2 and setup["test_batches"] > 0
    for chart in ("curves.png", "buckets.png"):
        assert (tmp_path / chart).read_bytes()[:4] == b"\x89PNG"

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text()) == results       # seconds too: nothing trained


@pytest.mark.parametrize("sweep, grown", [
    ({1: 2.0, 2: 1.5, 4: 1.7}, None),               # the best has a worse neighbour either side
    ({1: 2.0, 2: 1.8, 4: 1.7}, 8),                  # best at the top: one step further up
    ({1: 1.6, 2: 1.8, 4: 1.9}, 0.5),                # at the bottom: one step down
    ({1: 1.6}, None),                               # one value (--quick) is no grid
])
def test_the_grid_grows_past_the_edge_its_best_lies_on(sweep, grown):
    assert reproduce_small.next_value(sweep) == grown
