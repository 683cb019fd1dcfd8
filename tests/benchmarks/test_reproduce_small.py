"""benchmarks/reproduce_small.py --quick on the training tests' corpus: results.json as documented, both charts,
and a second invocation reuses the finished runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.paths import REPO

KEYS = {"valid_loss", "bits_per_byte", "tokens", "macs_per_token", "table_params", "other_params", "seconds"}


def test_quick_reproduction_reports_each_variant_and_resumes(shards, tmp_path):
    command = [sys.executable, "benchmarks/reproduce_small.py", "--quick", "--data", str(shards), "--out",
               str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"memoryformer", "memoryformer_paper", "memoryformer_l1", "dense", "setup"} == set(results)
    for name in ("memoryformer_paper", "memoryformer_l1", "dense"):
        entry = results[name]
        assert KEYS <= set(entry), name
        assert entry["tokens"] == results["dense"]["tokens"] == 20 * 8 * 128 and entry["valid_loss"] > 0
        assert len(entry["curve"]) >= 2 and entry["curve"][-1][1] == entry["lr_sweep"][f"{entry['lr']:g}"]
    for name in ("memoryformer_paper", "memoryformer_l1"):
        entropy = results[name]["bucket_entropy"]
        assert len(entropy) == 3 and all(0 < e <= 1 for e in entropy), entropy        # qkv, ml1, ml2 of 1 block
        assert results[name]["table_params"] > 0 and results[name]["weighting"] == name.rsplit("_", 1)[1]
    assert results["dense"]["table_params"] == 0 and "bucket_entropy" not in results["dense"]
    assert results["memoryformer"]["variant"] in ("memoryformer_paper", "memoryformer_l1")
    for chart in ("curves.png", "buckets.png"):
        assert (tmp_path / chart).read_bytes()[:4] == b"\x89PNG"

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["dense"]["valid_loss"] == results["dense"]["valid_loss"]
    assert json.loads((tmp_path / "results.json").read_text())["dense"]["seconds"] == results["dense"]["seconds"]
