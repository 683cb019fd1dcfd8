"""scripts/gpu_check.sh: without CUDA it says so and runs nothing; its verdict (scripts/gpu_check.py) judged here
from result files as the CUDA branch writes them, so the parser and the targets have run before the first GPU does.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.paths import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts/gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

LAYERS = [f"{model}/{layer}" for model in ("tiny", "small", "base") for layer in ("qkv", "ml1", "ml2")]


def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    result = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gpu_check: no CUDA GPU here" in result.stdout and not (tmp_path / "out").exists()


def test_the_script_runs_the_checks_the_verdict_knows():
    script = (REPO / "scripts/gpu_check.sh").read_text()
    assert re.findall(r'^check "([^"]+)"', script, flags=re.M) == list(gpu_check.JUDGES)


def _metrics(losses, skipped_at=None, scales=None):
    lines = []
    for step, loss in enumerate(losses, 1):
        record = {"step": step, "loss": loss, "skipped": float(step == skipped_at),
                  "skipped_steps": float(skipped_at is not None and step >= skipped_at), "tokens_per_sec": 91000.0,
                  "loss_scale": scales[step - 1] if scales else 1.0}
        lines.append(json.dumps(record))
    return "\n".join(lines) + "\n"


GOOD = {
    "kernel_tests.log": "........\n60 passed, 1 skipped in 41.30s\n",
    "kernel_parity.json": {"rows": [{"layer": layer, "dtype": dtype, "y_error": 2e-7, "dx_error": 3e-7,
                                     "dtables_error": 4e-7, "ok": True} for layer in LAYERS
                                    for dtype in ("fp32", "bf16")]},
    "memory_layer_cuda.json": {
        "summary": {layer: {"triton_fwdbwd_speedup_vs_reference": 7.5} for layer in LAYERS},
        "rows": [{"layer": layer, "impl": impl, "bandwidth_fraction": 0.64} for layer in LAYERS
                 for impl in ("reference", "triton", "linear")]},
    "train_throughput_cuda.json": {"summary": {"tiny/auto": {"whole/train": 1.4, "whole/prefill512": 1.9,
                                                             "whole/decode": 1.2}}},
    "run/metrics.jsonl": _metrics([10.9, 9.1, 7.8, 7.2]),
    "fp16/metrics.jsonl": _metrics([10.9, float("nan"), 9.8, 9.0, 8.7, 8.1], skipped_at=2,
                                   scales=[65536.0] + [32768.0] * 5),
}


def write(out, files, statuses=None):
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(content if isinstance(content, str) else json.dumps(content))
    checks = [{"name": name, "status": (statuses or {}).get(name, 0), "seconds": 30, "log": "x.log"}
              for name in gpu_check.JUDGES]
    (out / "checks.json").write_text(json.dumps(checks))
    return out


def test_a_run_that_meets_every_target_passes(tmp_path, capsys):
    assert gpu_check.main([str(write(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 checks met their targets" in out and "MISSED" not in out
    assert "fwd+bwd vs reference x7.5-x7.5 (target 5), bandwidth 64%-64% of copy (target 50%)" in out
    assert "loss 10.900 at step 1 -> 7.200 at step 4" in out and "loss scale 65536 -> 32768" in out


def _slower(files):
    files["memory_layer_cuda.json"]["summary"]["base/ml2"]["triton_fwdbwd_speedup_vs_reference"] = 4.2


def _starved(files):
    files["memory_layer_cuda.json"]["rows"][4]["bandwidth_fraction"] = 0.31


def _wrong(files):
    files["kernel_parity.json"]["rows"][3]["ok"] = False


def _diverged(files):
    files["run/metrics.jsonl"] = _metrics([10.9, 11.5, 12.0])


def _not_skipped(files):
    files["fp16/metrics.jsonl"] = _metrics([10.9, 10.1, 9.8])


def _failed_test(files):
    files["kernel_tests.log"] = "...F....\n1 failed, 59 passed in 40.00s\n"


def _missing(files):
    del files["train_throughput_cuda.json"]


@pytest.mark.parametrize("spoil, check, result", [
    (_slower, "Memory Layer speed", "MISSED"), (_starved, "Memory Layer speed", "MISSED"),
    (_wrong, "Triton against reference, MF shapes", "MISSED"), (_diverged, "20 bf16 steps of MF-tiny on Triton",
                                                                "MISSED"),
    (_not_skipped, "fp16 non-finite step skipped", "MISSED"), (_failed_test, "Triton kernel tests, compiled", "MISSED"),
    (_missing, "whole-model throughput", "MISSED"),
])
def test_each_miss_is_named_and_fails_the_run_unless_only_reporting(tmp_path, capsys, spoil, check, result):
    files = copy.deepcopy(GOOD)
    spoil(files)
    out = write(tmp_path, files)
    assert gpu_check.main([str(out)]) == 1
    assert gpu_check.main([str(out), "--report"]) == 0
    verdicts = {v.name: v for v in gpu_check.judge(out)}
    assert verdicts[check].status == result and all(v.status == "ok" for n, v in verdicts.items() if n != check)
    assert f"not met: {check}" in capsys.readouterr().out


def test_a_command_that_failed_or_timed_out_is_named_so(tmp_path):
    out = write(tmp_path, GOOD, statuses={"Memory Layer speed": 124, "whole-model throughput": 1})
    verdicts = {v.name: v.status for v in gpu_check.judge(out)}
    assert verdicts["Memory Layer speed"] == "TIMEOUT" and verdicts["whole-model throughput"] == "FAILED"
    assert gpu_check.main([str(out)]) == 1
