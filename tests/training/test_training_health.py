"""A run of non-finite steps stops the run (one alone is skipped and counted: test_precision.py); a loss spike rolls
back to the last checkpoint, a lasting rise stops the run."""
from __future__ import annotations

import torch

from megamem.checkpoint.read import read_checkpoint
from tests.training.runs import records, train


def test_consecutive_skips_stop_the_run(shards, tmp_path):
    """On two ranks, which stop on the same error: megamem train's supervisor exits with it and blames no rank.
    One micro-batch per rank and step, so the 3rd micro-batch is step 3's."""
    run = tmp_path / "run"
    result = train(shards, run, "train.max_consecutive_skips=3", "train.eval_interval=1000", steps=10, nproc=2,
                   fault="loss:nan:3+", returncode=2)
    assert "training diverged: the last 3 steps (to step 5) all had non-finite gradients" in result.stderr, \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "the job ended" not in result.stderr


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_its_batches(shards, tmp_path):
    """Micro-batch 25 is step 13's first: its loss x 10 makes the step's mean 5.5 times the recent ones. A checkpoint
    every step shows the state just after the rollback (step 13's): step 12's weights, Adam's moments and step, with
    the data position one step on (the README: the batches since the checkpoint, the spike's among them, are
    skipped, not read again)."""
    run = tmp_path / "run"
    result = train(shards, run, "train.spike_rollback=3", "checkpoint.interval=1", "checkpoint.keep=5",
                   "train.eval_interval=1000", steps=16, fault="loss:spike:25")
    assert "loss spike at step 13" in result.stdout and "rolled back to step-00000012" in result.stdout, \
        result.stdout[-3000:]
    steps = {r["step"]: r for r in records(run) if "loss" in r}
    assert [steps[s]["rollbacks"] for s in (12, 13, 14, 16)] == [0, 1, 1, 1]
    assert steps[13]["loss"] > 3 * steps[12]["loss"] and steps[14]["loss"] < 1.1 * steps[12]["loss"]
    assert sorted(steps) == list(range(1, 17))

    before, after = (read_checkpoint(run / "checkpoints" / f"step-{step:08d}") for step in (12, 13))
    for name, tensor in before.weights.items():
        assert torch.equal(after.weights[name], tensor), name
    for kind, moments in before.optimizer.items():
        for name, tensor in moments.items():
            assert torch.equal(after.optimizer[kind][name], tensor), (kind, name)
    assert after.optimizer_steps == before.optimizer_steps == 12
    assert after.marker.position.batches == before.marker.position.batches + 2 == 26     # 2 per step


def test_a_lasting_rise_is_not_rolled_back_for_ever(shards, tmp_path):
    run = tmp_path / "run"
    result = train(shards, run, "train.spike_rollback=3", "checkpoint.interval=4", "train.eval_interval=1000",
                   steps=30, fault="loss:spike:25+", returncode=2)
    assert result.stdout.count("rolled back to step-00000012") == 3, result.stdout[-3000:]
    assert "the loss spiked 4 times since step-00000012, so its level has shifted" in result.stderr
