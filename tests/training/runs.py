"""Real `megamem train` runs of cpu-smoke for the training tests, and what they logged."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.paths import CONFIGS, REPO

# Layouts are compared exactly under the kernel that defines correctness, the paper's weighting and one LR for the
# whole model; what ships (`auto`: the fused kernel, tables at 24x the LR) is compared statistically
# (test_layout_statistics.py). Exactly means over EXACT_STEPS steps: a layout sums in another order where a sum
# crosses ranks, so its losses start about 1e-7 from one process's, but a rounding-level change can flip one hash
# code (one token to another row), and Adam moves a row it touches by about the LR whatever the gradient. From the
# step after a flip runs part ways, about fivefold a step: seen here, 8e-6 in the loss the step after a flip and
# 1.3e-4 in the gradient norm three steps after, alike in every tensor-parallel layout. A flip in step 1 leaves
# steps 1-3 within about 2e-5 of each other; 1e-4 is still far below what a wrong reduction gives (1e-2 and more).
# The tables' LR is pinned to the model's for that reason: at the shipped 24x a flip in step 1 parts the layouts by
# 4e-4 in step 3's gradient norm, and the window of rounding-level agreement would shrink to two steps.
EXACT_STEPS = 3
LAYOUT_STEPS = 2 * EXACT_STEPS        # tests/conftest.py: what the layout runs train
REFERENCE_NUMERICS = ["model.kernel=reference", "model.weighting=paper", "optimizer.table_lr_multiplier=1"]


MEGAMEM = [sys.executable, "-m", "megamem.cli.main"]


def train(shards, run_dir, *overrides, nproc=1, steps=10, background=False, returncode=0, fault=None,
          file_size_limit=None, megamem=MEGAMEM):
    """Runs to the end and checks its exit status, or (`background`) returns the process, in its own process group
    so that a test can signal the whole group as a terminal or SLURM would. `fault`: MEGAMEM_FAULT (megamem.faults);
    `file_size_limit`: bytes any file may reach (RLIMIT_FSIZE), so that a large write really fails, with EFBIG;
    `megamem`: the command that runs megamem."""
    command = [*megamem, "train", str(CONFIGS / "cpu-smoke.yaml"),
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


# Runs several tests compare with, trained once per session (tests/conftest.py). Straight runs: cpu-smoke
# as it ships for STRAIGHT_STEPS steps, uninterrupted (what a stopped, resumed or lower-precision run is held to).
# Layout runs: cpu-smoke at a global batch of 16 under the reference numerics, validated and checkpointed every
# EXACT_STEPS steps, for twice that: layouts are compared over the first EXACT_STEPS, and a run megamem reshard
# re-cuts at EXACT_STEPS is held to its source's own later steps. The LR schedule depends on train.steps, so every
# layout run has the same number.
STRAIGHT_STEPS = 20
STRAIGHT = ["train.eval_interval=1000", "checkpoint.interval=1000"]
STRAIGHTS = {"one-process": (1, []), "two-pipeline-stages": (2, ["parallel.pp=2"])}

# Precision runs: cpu-smoke for PRECISION_STEPS steps whose 3rd training micro-batch has a non-finite loss (step 2's
# first in every layout here: 2 micro-batches a step), in fp32 (megamem's AdamW at ZeRO 0, DeepSpeed's ZeRO 1),
# bf16 (what the shipped configs train in) at ZeRO 0-3 and in the parallel layouts, and fp16 (tests/training/
# fp16_on_cpu.py).
PRECISION_STEPS = 20
PRECISION_FAULT = "loss:nan:3"
FP16_ON_CPU = [sys.executable, str(REPO / "tests/training/fp16_on_cpu.py")]
PRECISIONS = {
    "fp32-zero0": (1, []), "fp32-zero1": (1, ["parallel.zero_stage=1"]),
    **{f"bf16-zero{z}": (1, ["train.precision=bf16", f"parallel.zero_stage={z}"]) for z in range(4)},
    "bf16-tp2": (2, ["train.precision=bf16", "parallel.tp=2", "parallel.zero_stage=1"]),
    "bf16-pp2": (2, ["train.precision=bf16", "parallel.pp=2", "parallel.zero_stage=1"]),
    "bf16-tp2-pp2": (4, ["train.precision=bf16", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"]),
    "fp16-zero0": (1, ["train.precision=fp16"], FP16_ON_CPU),
}

EXACT = ["train.global_batch_size=16", f"train.eval_interval={EXACT_STEPS}", f"checkpoint.interval={EXACT_STEPS}",
         "checkpoint.keep=2", *REFERENCE_NUMERICS]
LAYOUTS = {                   # name: (ranks, overrides)
    "one": (1, []),
    "dense": (1, ["model.arch=dense"]),
    "column": (2, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "table": (2, ["parallel.tp=2", "parallel.table_sharding=table"]),
    **{f"tp2-dp2-zero{z}": (4, ["parallel.tp=2", f"parallel.zero_stage={z}"]) for z in (1, 2, 3)},
    "pp2": (2, ["parallel.pp=2"]),
    "tp2-pp2": (4, ["parallel.pp=2", "parallel.tp=2"]),
    "pp2-dp2-zero1": (4, ["parallel.pp=2", "parallel.zero_stage=1"]),
    "pp2-checkpointed": (2, ["parallel.pp=2", "train.activation_checkpointing=true"]),
    "dense-pp2": (2, ["model.arch=dense", "parallel.pp=2"]),
}


@dataclass
class TrainedRun:
    dir: Path
    stdout: str

    def checkpoint(self, step: int = EXACT_STEPS) -> Path:
        return self.dir / "checkpoints" / f"step-{step:08d}"


class Runs:
    """`specs[name] = (ranks, overrides)` or `(ranks, overrides, megamem)`, each trained with `common` for `steps`
    (with `fault`, if any) when first asked for in the session (tests/shared.py)."""

    def __init__(self, shards, shared, specs: dict, common: list[str], steps: int, fault: str | None = None):
        self.shards, self.shared = shards, shared
        self.specs, self.common, self.steps, self.fault = specs, common, steps, fault

    def __getitem__(self, name: str) -> TrainedRun:
        ranks, overrides, *megamem = self.specs[name]

        def make(run: Path) -> dict:
            result = train(self.shards, run, *self.common, *overrides, nproc=ranks, steps=self.steps,
                           fault=self.fault, megamem=megamem[0] if megamem else MEGAMEM)
            return {"stdout": result.stdout}

        run, made = self.shared.once(f"run-{name}", make)
        return TrainedRun(run, made["stdout"])
