"""A rank lost mid-run (SIGKILL) or frozen (SIGSTOP): the job ends within its bound with the rank named, and a
relaunch with --resume auto continues from the last checkpoint."""
from __future__ import annotations

import re
import signal
import time

import psutil
import pytest

from megamem.training.supervisor import LOST_PEERS_EXIT, RANK_GRACE_S
from tests.paths import REPO
from tests.training.runs import losses, rank_process, train, wait_for_step

pytestmark = pytest.mark.slow          # every test here takes more than 30 s

TIMEOUT_S = 8
SETTINGS = ["checkpoint.interval=4", "train.eval_interval=1000", "data.num_workers=1",
            f"train.collective_timeout_s={TIMEOUT_S}"]


@pytest.mark.parametrize("signum, bound", [
    (signal.SIGKILL, RANK_GRACE_S),                 # peers see a closed connection at once
    (signal.SIGSTOP, TIMEOUT_S + RANK_GRACE_S),     # peers wait train.collective_timeout_s first
], ids=["killed", "stopped"])
def test_lost_rank_ends_the_job_named_and_resume_is_exact(shards, tmp_path, signum, bound):
    """The bounds are the README's: a rank that dies ends the job within RANK_GRACE_S, a stalled one within
    train.collective_timeout_s more. Exact: the steps the lost job logged after its last checkpoint come out the
    same when the relaunch redoes them."""
    run = tmp_path / "run"
    process = train(shards, run, *SETTINGS, steps=12, nproc=2, background=True)
    wait_for_step(process, run, 6)
    victim = rank_process(process, 1)
    victim.send_signal(signum)
    sent = time.monotonic()
    output, _ = process.communicate(timeout=120)
    ended = time.monotonic() - sent
    assert ended < bound, (ended, output[-3000:])
    assert process.returncode != 0
    if signum == signal.SIGKILL:
        assert f"rank 1 (pid {victim.pid}) was killed by SIGKILL" in output and process.returncode == 137, \
            output[-3000:]
        assert f"rank(s) 0 exited {LOST_PEERS_EXIT} (lost their peers)" in output, output[-3000:]
    else:
        assert "rank(s) 1 stopped responding (process stopped" in output, output[-3000:]
        assert "Timed out waiting" in output                    # rank 0's own line: its collective timed out
    saved = re.search(r"relaunch with --resume auto: it continues from \S+/step-(\d+)", output)
    assert saved, output[-3000:]
    assert not psutil.pid_exists(victim.pid)                       # nothing of the job is left running

    before = losses(run)
    redone = [step for step in before if step > int(saved[1])]
    assert redone, before                                   # the job got past its checkpoint before it was hit
    resumed = train(shards, run, *SETTINGS, steps=12, nproc=2)
    assert f"at step {int(saved[1])}" in resumed.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, 13))
    for step in redone:
        assert got[step] == pytest.approx(before[step], rel=1e-6, abs=1e-7), step


def test_ranks_outliving_a_killed_supervisor_save_and_stop(shards, tmp_path):
    """The ranks get SIGTERM when their supervisor dies (the parent-death signal), so none trains on unwatched."""
    run = tmp_path / "run"
    process = train(shards, run, "checkpoint.interval=1000", "train.eval_interval=1000", steps=200, nproc=2,
                    background=True)
    wait_for_step(process, run, 3)
    ranks = [rank_process(process, rank) for rank in (0, 1)]
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive
    saved = [p.name for p in (run / "checkpoints").glob("step-*")]
    assert len(saved) == 1 and saved[0] < "step-00000200", saved


def test_the_readme_states_the_bounds_tested_here():
    readme = (REPO / "README.md").read_text()
    assert f"A rank that dies ends the job within {RANK_GRACE_S:.0f} s with the rank named; a\n  stalled one within " \
           f"`train.collective_timeout_s` (600) more." in readme
