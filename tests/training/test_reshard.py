"""megamem reshard: checkpoints of one layout continue in another, with the losses of their own run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megamem.cli.main import main
from tests.paths import REPO
from tests.training.runs import EXACT_STEPS, LAYOUT_STEPS, losses

pytestmark = pytest.mark.slow          # every test here takes more than 30 s


def megamem(*args: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megamem.cli.main", *args, *(["--nproc", str(nproc)] if nproc else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def reshard(capsys, source, output, *layout: str) -> tuple[int, str]:
    """(exit status, stderr) of megamem reshard, run in this process: it reads and writes files and starts no rank."""
    status = main(["reshard", str(source.dir), *layout, "--checkpoint", str(source.checkpoint()), "--output",
                   str(output)])
    return status, capsys.readouterr().err


def test_resharded_runs_continue_with_their_sources_losses(layout_runs, tmp_path, capsys):
    """Sources of three layouts are re-cut at step 3 and trained on to step 6 in another: tp 2 -> 1 (ZeRO 1 -> 1),
    pp 2 -> tp 2 (torch's AdamW state on whole tensors -> on shards, ZeRO 0), pp 2 -> pp 1 x dp 2 (torch's AdamW
    state -> ZeRO 1 partitions; the data position follows the data-parallel size), pp 2 x dp 2 -> tp 1 (ZeRO 1
    partitions of two stages -> ZeRO 3). Weights, Adam's moments and step, the LR schedule and the data position
    are carried, so each resumed step is the same loss on the same batch as the source's own step, to the 1e-4 the
    layouts themselves agree to over a few steps (tests/training/runs.py); a lost moment or a restarted schedule
    moves the loss by more than 1e-2."""
    targets = [("column", "tp1", 1, ["--tp", "1", "--pp", "1"]),
               ("pp2", "tp2", 2, ["--tp", "2", "--pp", "1"]),
               ("pp2", "dp2", 2, ["--tp", "1", "--pp", "1", "--set", "parallel.zero_stage=1"]),
               ("pp2-dp2-zero1", "tp1-zero3", 1, ["--tp", "1", "--pp", "1", "--set", "parallel.zero_stage=3"])]
    for source, name, nproc, layout in targets:
        out = tmp_path / f"{source}-to-{name}"
        status, err = reshard(capsys, layout_runs[source], out, *layout)
        assert status == 0, err[-3000:]
        resumed = megamem("train", str(out / "config.yaml"), nproc=nproc)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"at step {EXACT_STEPS}" in resumed.stdout, resumed.stdout[-2000:]
        got, expected = losses(out), losses(layout_runs[source].dir)
        assert sorted(got) == list(range(EXACT_STEPS + 1, LAYOUT_STEPS + 1)), name
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=1e-4), (source, name, step)

    # the source itself, resumed in another layout without resharding, is refused, naming the way out
    pp2 = layout_runs["pp2"].dir
    moved = megamem("train", str(pp2 / "config.yaml"), "--set", "parallel.pp=1")
    assert moved.returncode == 2 and "was written with parallel.tp=1, parallel.pp=2, 1 data-parallel replica(s), " \
        "ZeRO 0; this run has parallel.tp=1, 1 data-parallel" in moved.stderr and "megamem reshard" in moved.stderr, \
        moved.stderr[-2000:]
    # an output that already holds a run is not overwritten
    status, err = reshard(capsys, layout_runs["column"], tmp_path / "column-to-tp1", "--tp", "1", "--pp", "1")
    assert status == 2 and "already holds checkpoints" in err


def test_optimizer_state_that_cannot_be_read_needs_weights_only(layout_runs, tmp_path, capsys):
    zero3 = layout_runs["tp2-dp2-zero3"]
    status, err = reshard(capsys, zero3, tmp_path / "out", "--tp", "1", "--pp", "1")
    assert status == 2 and "Fix: pass --weights-only" in err, err[-2000:]
    status, err = reshard(capsys, zero3, tmp_path / "out", "--tp", "1", "--pp", "1", "--weights-only",
                          "--set", "parallel.zero_stage=0", "--set", "train.precision=bf16")
    assert status == 2 and "Fix: --set parallel.zero_stage=1" in err, err[-2000:]
    status, err = reshard(capsys, zero3, tmp_path / "out", "--tp", "1", "--pp", "1", "--weights-only",
                          "--set", "parallel.zero_stage=0", "--set", f"train.steps={EXACT_STEPS + 1}")
    assert status == 0, err[-2000:]
    exported = main(["export", str(tmp_path / "out"), "--output", str(tmp_path / "out.safetensors")])
    assert exported == 0, capsys.readouterr().err[-2000:]            # a resharded checkpoint reads like any
    resumed = megamem("train", str(tmp_path / "out" / "config.yaml"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Adam's moments start from zero" in resumed.stdout and sorted(losses(tmp_path / "out")) == [EXACT_STEPS + 1]
