"""Real `megamem train` runs of cpu-smoke for the training tests, and what they logged."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.paths import CONFIGS, REPO

# Layout-equivalence tests compare runs on the kernel that defines correctness, with the paper's weighting: their
# 1e-4 bound was measured so (rounding-level differences in sums across ranks, amplified by the odd hash flip). On
# the fused CPU kernel with l1 weighting the same layouts drifted apart by 1.2e-4 to 5e-4 by step 5 to 10, more
# flips, not a wrong sum: tests/kernels holds the fused kernels to the reference, both weightings.
REFERENCE_NUMERICS = ["model.kernel=reference", "model.weighting=paper"]


def train(shards, run_dir, *overrides, nproc=1, steps=10, background=False, returncode=0, fault=None,
          file_size_limit=None):
    """Runs to the end and checks its exit status, or (`background`) returns the process, in its own process group
    so that a test can signal the whole group as a terminal or SLURM would. `fault`: MEGAMEM_FAULT (megamem.faults);
    `file_size_limit`: bytes any file may reach (RLIMIT_FSIZE), so that a large write really fails, with EFBIG."""
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIGS / "cpu-smoke.yaml"),
               "--set", f"data.path={shards}", "--set", f"run.dir={run_dir}", "--set", f"train.steps={steps}",
               "--set", "logging.interval=1", "--set", "data.num_workers=0", "--nproc", str(nproc)]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fault:
        env["MEGAMEM_FAULT"] = fault
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=None if file_size_limit is None else lambda: _limit_files(file_size_limit))
    assert result.returncode == returncode, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _limit_files(size: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit then fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


def grad_norms(run_dir) -> dict[int, float]:
    return losses(run_dir, "grad_norm")


def wait_for_step(process, run_dir, step: int, timeout: float = 300) -> None:
    """Until metrics.jsonl has logged `step` (cpu-smoke runs log every step)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(r.get("step", 0) >= step and "loss" in r for r in _complete(metrics)):
            return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")


def _complete(metrics: Path) -> list[dict]:
    lines = metrics.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def rank_process(process, rank: int):
    """The rank's own process among the supervisor's children (its DataLoader workers share its command line)."""
    import psutil

    ranks = [p for p in psutil.Process(process.pid).children() if p.environ().get("RANK") == str(rank)]
    assert len(ranks) == 1, ranks
    return ranks[0]
