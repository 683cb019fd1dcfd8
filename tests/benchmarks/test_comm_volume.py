"""benchmarks/comm_volume.py end to end on the MF-tiny shape: counted rows equal their formulas, JSON as documented.
tp = 2 alone is run here: the byte counters at tp = 2 and 4 are tested in tests/parallel/test_tensor_parallel.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import REPO


@pytest.mark.slow
def test_counted_bytes_equal_the_formulas_and_the_json_has_every_row(tmp_path):
    out = tmp_path / "comm.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/comm_volume.py"), "--shapes", "tiny", "--seq-len",
                             "128", "--counted-tp", "2", "--json", str(out)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "!= FORMULA" not in result.stdout and "column_fp32_vs_megatron" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["tp"], r["p_dtype"]) for r in rows} == {
        (layout, tp, p) for tp in (2, 4, 8)
        for layout, p in [("column", "fp32"), ("column", "fp16"), ("table", "fp32"), ("table", "fp16"),
                          ("pythia", None), ("megatron", None)]}
    for row in rows:
        assert row["source"] == ("counted" if row["tp"] == 2 else "formula")
        assert row["fwd_bytes_per_token"] > 0 and row["bwd_bytes_per_token"] > 0
        assert row.get("matches_formula", True), row
