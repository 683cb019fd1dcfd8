"""Preemption as clusters deliver it: a stop signal to the main process, to the whole process group (DataLoader
workers included, as SLURM and Ctrl-C deliver it) or to one rank of two, ends in one checkpoint on every rank and
exit 0, and the resumed run is the uninterrupted one."""
from __future__ import annotations

import os
import signal

import pytest

from tests.training.runs import losses, rank_process, records, train, wait_for_step

STEPS = 20


def _send(process, signum: int, delivery: str) -> None:
    if delivery == "group":
        os.killpg(process.pid, signum)
    elif delivery == "main":
        process.send_signal(signum)
    else:                                    # "rank1": one rank's own process, as a node-local kill would
        rank_process(process, 1).send_signal(signum)


@pytest.mark.parametrize("nproc, layout, deliveries", [
    (1, [], [("SIGTERM", "group", 2), ("SIGUSR1", "main", 0), ("SIGINT", "group", 1)]),
    (2, ["parallel.pp=2"], [("SIGTERM", "rank1", 1)]),
], ids=["one-process", "two-pipeline-stages"])
def test_stop_signal_saves_once_and_resume_is_exact(shards, tmp_path, nproc, layout, deliveries):
    """Each delivery: signal after step 10 with `workers` DataLoader workers, resume with another worker count (the
    batches do not depend on it), and compare every later step's loss with an uninterrupted run to 1e-6 (fp32)."""
    common = ["train.eval_interval=1000", "checkpoint.interval=1000", *layout]
    straight = tmp_path / "straight"
    train(shards, straight, *common, steps=STEPS, nproc=nproc)
    reference = losses(straight)
    for name, delivery, workers in deliveries:
        run = tmp_path / f"{name}-{delivery}"
        process = train(shards, run, *common, f"data.num_workers={workers}", steps=STEPS, nproc=nproc,
                        background=True)
        wait_for_step(process, run, 10)
        _send(process, getattr(signal, name), delivery)
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, (name, delivery, output[-3000:])
        assert "Traceback" not in output and "exited unexpectedly" not in output, output[-3000:]
        saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
        assert len(saved) == 1 and saved[0] < f"step-{STEPS:08d}", saved
        stopped_at = int(saved[0].split("-")[1])
        assert f"stopping at step {stopped_at} on request" in output

        resumed = train(shards, run, *common, f"data.num_workers={(workers + 1) % 3}", steps=STEPS, nproc=nproc)
        assert f"at step {stopped_at}" in resumed.stdout
        steps = [r["step"] for r in records(run) if "loss" in r]
        assert steps == list(range(1, STEPS + 1)), steps            # each step logged once, also past the stop
        got = losses(run)
        for step in range(stopped_at + 1, STEPS + 1):
            assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (name, delivery, step)
