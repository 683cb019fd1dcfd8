"""Preemption as clusters deliver it: a stop signal to the main process, to the whole process group (DataLoader
workers included, as SLURM and Ctrl-C deliver it) or to one rank of two, ends in one checkpoint on every rank and
exit 0, and the resumed run is the uninterrupted one."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.training.runs import STRAIGHT, STRAIGHT_STEPS, STRAIGHTS, losses, rank_process, records, train, wait_for_step

STEPS = STRAIGHT_STEPS


def _send(process, signum: int, delivery: str) -> None:
    if delivery == "group":
        os.killpg(process.pid, signum)
    elif delivery == "main":
        process.send_signal(signum)
    else:                                    # "rank1": one rank's own process, as a node-local kill would
        rank_process(process, 1).send_signal(signum)


@pytest.mark.slow
@pytest.mark.parametrize("layout, deliveries", [
    ("one-process", [("SIGTERM", "group", 2, True), ("SIGUSR1", "main", 0, False), ("SIGINT", "group", 1, False)]),
    ("two-pipeline-stages", [("SIGTERM", "rank1", 1, True), ("SIGTERM", "group", 0, False)]),
], ids=["one-process", "two-pipeline-stages"])
def test_stop_signal_saves_once_and_resume_is_exact(shards, straight_runs, tmp_path, layout, deliveries):
    """Each delivery: signal after step 10 with `workers` DataLoader workers; one checkpoint, exit 0. Where `resume`,
    resume with another worker count (the batches do not depend on it), and compare every later step's loss with an
    uninterrupted run to 1e-6 (fp32): the resume does not depend on which signal stopped the run."""
    nproc, overrides = STRAIGHTS[layout]
    common = [*STRAIGHT, *overrides]
    reference = losses(straight_runs[layout].dir)
    for name, delivery, workers, resume in deliveries:
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
        if not resume:
            continue

        resumed = train(shards, run, *common, f"data.num_workers={(workers + 1) % 3}", steps=STEPS, nproc=nproc)
        assert f"at step {stopped_at}" in resumed.stdout
        steps = [r["step"] for r in records(run) if "loss" in r]
        assert steps == list(range(1, STEPS + 1)), steps            # each step logged once, also past the stop
        got = losses(run)
        for step in range(stopped_at + 1, STEPS + 1):
            assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (name, delivery, step)


def test_a_second_ctrl_c_aborts_every_rank(shards, tmp_path):
    """Both reach the ranks through megamem train's supervisor (the terminal signals its process group only)."""
    run = tmp_path / "run"
    process = train(shards, run, steps=STEPS, nproc=2, background=True)
    deadline = time.monotonic() + 120
    while not (run / "config.yaml").exists():            # written once the ranks handle stop signals
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130 and "aborted by a second Ctrl-C, without a checkpoint" in output, output[-3000:]
    assert not list((run / "checkpoints").glob("step-*/megamem.json"))
