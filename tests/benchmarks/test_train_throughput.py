"""benchmarks/train_throughput.py --quick: every model, part and phase measured, the JSON as documented, a chart."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import REPO

PHASES = ("prefill512", "prefill2048", "decode", "train")


@pytest.mark.slow
def test_quick_run_writes_every_row_and_a_chart(tmp_path):
    out, png = tmp_path / "throughput.json", tmp_path / "throughput.png"
    command = [sys.executable, "benchmarks/train_throughput.py", "--quick", "--json", str(out), "--png", str(png),
               "--profile", "blocks/train"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["model"], r["part"], r["phase"]): r for r in report["rows"]}
    assert set(rows) == {(model, part, phase) for model in ("mf-smoke", "dense-smoke") for part in ("blocks", "whole")
                         for phase in PHASES}
    for key, row in rows.items():
        assert row["tokens_per_sec"] > 0 and row["macs_per_token"] > 0 and row["peak_mem_gb"] > 0, key
        if row["phase"] == "train":
            assert row["fwdbwd_tokens_per_sec"] > row["tokens_per_sec"] > 0 and row["optimizer_ms"] > 0, key
    for phase in PHASES:        # the count: a Memory Layer reads K rows where a Linear multiplies a whole matrix
        assert rows[("mf-smoke", "blocks", phase)]["macs_per_token"] < rows[("dense-smoke", "blocks", phase)][
            "macs_per_token"]
        assert rows[("mf-smoke", "blocks", phase)]["macs_per_token"] < rows[("mf-smoke", "whole", phase)][
            "macs_per_token"]
    summary = report["summary"]["smoke/auto"]
    assert set(summary["targets_met"]) == {"prefill512", "decode", "train"}
    assert {f"{part}/{phase}" for part in ("blocks", "whole") for phase in PHASES} <= set(summary)
    assert 0 < summary["memoryformer_outside_blocks_macs_fraction"] < 1
    ops = report["profile"]["ops"]["mf-smoke"]
    assert report["profile"]["of"] == "blocks/train" and len(ops) > 3 and all(ms >= 0 for _, ms, _ in ops)
    assert any("GatherSum" in op for op, _, _ in ops), ops        # the fused kernel's backward is among the costliest
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MemoryFormer over dense" in result.stdout and "targets (block stack)" in result.stdout
