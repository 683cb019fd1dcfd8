"""megamem reshard: checkpoints of one layout continue in another, with the losses of an uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.paths import REPO
from tests.training.runs import REFERENCE_NUMERICS, losses, train

BATCH = ["train.global_batch_size=16", "train.eval_interval=1000", "checkpoint.interval=5", *REFERENCE_NUMERICS]


def megamem(*args: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megamem.cli.main", *args, *(["--nproc", str(nproc)] if nproc else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def reshard(source, output, *layout: str) -> subprocess.CompletedProcess:
    return megamem("reshard", str(source), *layout, "--checkpoint", str(source / "checkpoints" / "step-00000005"),
                   "--output", str(output))


def test_resharded_runs_continue_with_the_uninterrupted_losses(shards, tmp_path):
    """Sources of three layouts are re-cut at step 5 and trained on to step 10 in another: tp 2 -> 1 and 4 (ZeRO 1
    -> 1 and 0), pp 2 -> pp 1 x dp 2 (fp32 ZeRO 0, torch's AdamW state -> ZeRO 1 partitions; the data position
    follows the data-parallel size), tp 2 x pp 2 -> tp 1 (ZeRO 1 -> 3). Weights, Adam's moments and step, the LR
    schedule and the data position are carried, so step 6 is the same loss on the same batch and steps 6-10 are
    the one-process run's, to the 1e-4 the layouts themselves agree to (see
    test_train_runs); a lost moment or a restarted schedule moves the loss by more than 1e-2."""
    train(shards, tmp_path / "one", *BATCH)
    reference = losses(tmp_path / "one")
    sources = {"tp2": (2, ["parallel.tp=2", "parallel.zero_stage=1"]),
               "pp2": (2, ["parallel.pp=2"]),
               "tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"])}
    targets = [("tp2", "tp1", 1, ["--tp", "1", "--pp", "1"]),
               ("tp2", "tp4", 4, ["--tp", "4", "--pp", "1", "--set", "parallel.zero_stage=0"]),
               ("pp2", "dp2", 2, ["--tp", "1", "--pp", "1", "--set", "parallel.zero_stage=1"]),
               ("tp2-pp2", "tp1-zero3", 1, ["--tp", "1", "--pp", "1", "--set", "parallel.zero_stage=3"])]
    for name, (nproc, overrides) in sources.items():
        train(shards, tmp_path / name, *BATCH, *overrides, nproc=nproc)
    for source, name, nproc, layout in targets:
        out = tmp_path / f"{source}-to-{name}"
        made = reshard(tmp_path / source, out, *layout)
        assert made.returncode == 0, made.stderr[-3000:]
        resumed = megamem("train", str(out / "config.yaml"), nproc=nproc)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "at step 5" in resumed.stdout, resumed.stdout[-2000:]
        got = losses(out)
        assert sorted(got) == list(range(6, 11)), name
        for step in range(6, 11):
            assert got[step] == pytest.approx(reference[step], rel=1e-4), (source, name, step)

    # the source itself, resumed in another layout without resharding, is refused, naming the way out
    moved = megamem("train", str(tmp_path / "pp2" / "config.yaml"), "--set", "parallel.pp=1")
    assert moved.returncode == 2 and "was written with parallel.tp=1, parallel.pp=2, 1 data-parallel replica(s), " \
        "ZeRO 0; this run has parallel.tp=1, 1 data-parallel" in moved.stderr and "megamem reshard" in moved.stderr, \
        moved.stderr[-2000:]
    # an output that already holds a run is not overwritten
    again = reshard(tmp_path / "tp2", tmp_path / "tp2-to-tp1", "--tp", "1", "--pp", "1")
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_optimizer_state_that_cannot_be_read_needs_weights_only(shards, tmp_path):
    train(shards, tmp_path / "zero3", "parallel.zero_stage=3", "checkpoint.interval=5", steps=5)
    refused = reshard(tmp_path / "zero3", tmp_path / "out", "--tp", "1", "--pp", "1")
    assert refused.returncode == 2 and "Fix: pass --weights-only" in refused.stderr, refused.stderr[-2000:]
    mixed = reshard(tmp_path / "zero3", tmp_path / "out", "--tp", "1", "--pp", "1", "--weights-only",
                    "--set", "parallel.zero_stage=0", "--set", "train.precision=bf16")
    assert mixed.returncode == 2 and "Fix: --set parallel.zero_stage=1" in mixed.stderr, mixed.stderr[-2000:]
    made = reshard(tmp_path / "zero3", tmp_path / "out", "--tp", "1", "--pp", "1", "--weights-only",
                   "--set", "parallel.zero_stage=0", "--set", "train.steps=6")
    assert made.returncode == 0, made.stderr[-2000:]
    exported = megamem("export", str(tmp_path / "out"), "--output", str(tmp_path / "out.safetensors"))
    assert exported.returncode == 0, exported.stderr[-2000:]            # a resharded checkpoint reads like any
    resumed = megamem("train", str(tmp_path / "out" / "config.yaml"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Adam's moments start from zero" in resumed.stdout and sorted(losses(tmp_path / "out")) == [6]
