"""N training ranks on this machine, watched: what `megamem train --nproc N` runs.

The supervisor starts each rank itself (the environment torchrun would give it)
rather than through a launcher that kills ranks still saving 30 s after a
signal. It passes every stop signal it receives (SIGTERM, SIGUSR1, Ctrl-C) to
all ranks, which agree on one final checkpoint. Ranks run in their own process
group, so a signal sent to the terminal's group reaches each rank exactly once,
and they get SIGTERM if the supervisor itself dies. When a rank dies, the others
cannot finish a step without it: the supervisor names the lost rank, gives the
rest RANK_GRACE_S to exit and kills what remains, so the job ends within that
bound (a stalled rank holds its peers' next collective for at most
train.collective_timeout_s, after which they fail and the same happens).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megamem.ports import free_port
from megamem.stop_signals import STOP_SIGNALS, stop_signals_held

RANK_GRACE_S = 10.0
LOST_PEERS_EXIT = 3         # how a rank whose collectives failed for want of a peer exits (megamem.training.entry)
POLL_S = 0.1
PR_SET_PDEATHSIG = 1


@dataclass
class RankExit:
    rank: int
    pid: int
    returncode: int

    def describe(self) -> str:
        if self.returncode < 0:
            return f"rank {self.rank} (pid {self.pid}) was killed by {signal.Signals(-self.returncode).name}"
        return f"rank {self.rank} (pid {self.pid}) exited with status {self.returncode}"

    @property
    def status(self) -> int:
        """The shell's convention: 128 + the signal for a rank a signal killed."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode


def _terminate_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stopped(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


class LocalRanks:
    """`command` runs one rank (megamem.training.entry); `env` is the environment every rank starts from."""

    def __init__(self, command: list[str], nproc: int, env: dict[str, str], run_dir: Path):
        self.command, self.nproc, self.env, self.run_dir = command, nproc, env, run_dir
        self.processes: list[subprocess.Popen] = []
        self.signals: list[str] = []

    def run(self) -> int:
        """Start the ranks and wait for them; returns the job's exit status (0: every rank finished or stopped
        cleanly)."""
        port = str(free_port())
        previous = {signum: signal.signal(signum, self._forward) for signum in STOP_SIGNALS}
        try:
            # Held back while ranks start, in this process and (the mask outlives exec) in each rank until its
            # StopRequest listens: a signal meanwhile reaches every rank once they all exist, and none dies of it.
            with stop_signals_held():
                for rank in range(self.nproc):
                    env = dict(self.env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.nproc),
                               LOCAL_WORLD_SIZE=str(self.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
                    self.processes.append(subprocess.Popen(self.command, env=env, start_new_session=True,
                                                           preexec_fn=_terminate_with_parent))
            return self._watch()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_remaining()

    def _forward(self, signum: int, _frame) -> None:
        self.signals.append(signal.Signals(signum).name)
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def _watch(self) -> int:
        while True:
            codes = [process.poll() for process in self.processes]
            failed = [RankExit(rank, self.processes[rank].pid, code) for rank, code in enumerate(codes)
                      if code not in (None, 0)]
            if failed:                          # a rank that only lost its peers is not the cause
                return self._end_after_failure(min(failed, key=lambda f: f.returncode == LOST_PEERS_EXIT))
            if all(code == 0 for code in codes):
                if self.signals:
                    print(f"megamem train: stopped on {self.signals[0]} after every rank saved its checkpoint; "
                          f"continue with --resume auto", file=sys.stderr)
                return 0
            time.sleep(POLL_S)

    def _end_after_failure(self, first: RankExit) -> int:
        """Name the lost rank (and a stalled one: a rank that SIGSTOP froze makes its peers time out first), give the
        others that still run RANK_GRACE_S to exit, then kill them; a stopped rank cannot exit, so it is not waited
        for."""
        if self.signals.count("SIGINT") > 1:         # the ranks did as asked
            self._kill_remaining()
            print("megamem train: aborted by a second Ctrl-C, without a checkpoint", file=sys.stderr)
            return 130
        failed_at = time.monotonic()
        stalled = [rank for rank, process in enumerate(self.processes)
                   if process.poll() is None and _stopped(process.pid)]
        running = [process for rank, process in enumerate(self.processes) if rank not in stalled]
        while time.monotonic() - failed_at < RANK_GRACE_S and any(p.poll() is None for p in running):
            time.sleep(POLL_S)
        killed = self._kill_remaining()
        codes = {process.returncode for process in self.processes}
        if not killed and len(codes) == 1 and first.returncode > 0 and first.returncode != LOST_PEERS_EXIT:
            return first.returncode             # every rank stopped on the same error, which each has printed
        ended = time.monotonic() - failed_at
        lost = first.describe()
        if stalled:
            lost = (f"rank(s) {', '.join(map(str, stalled))} stopped responding (process stopped, e.g. by SIGSTOP), "
                    f"so {lost} after train.collective_timeout_s")
        cut_off = [rank for rank, process in enumerate(self.processes)
                   if process.returncode == LOST_PEERS_EXIT and rank != first.rank]
        rest = f"; rank(s) {', '.join(map(str, cut_off))} exited {LOST_PEERS_EXIT} (lost their peers)" if cut_off \
            else ""
        running_killed = [rank for rank in killed if rank not in stalled]
        if running_killed:
            rest += f"; killed rank(s) {', '.join(map(str, running_killed))} still running after {RANK_GRACE_S:.0f} s"
        from megamem.checkpoint.catalog import complete_checkpoints

        saved = complete_checkpoints(self.run_dir)
        resume = f"it continues from {saved[-1]}" if saved else "no checkpoint was saved yet, so it starts over"
        print(f"megamem train: error: {lost}; the job ended {ended:.1f} s later{rest}. Fix the cause (the lost "
              f"rank's output above) and relaunch with --resume auto: {resume}", file=sys.stderr)
        return first.status or 1

    def _kill_remaining(self) -> list[int]:
        killed = []
        for rank, process in enumerate(self.processes):
            if process.poll() is None:
                process.kill()
                killed.append(rank)
        for process in self.processes:
            process.wait()
        return killed


def rank_command(configs: list[str], overrides: list[str], resume: str) -> list[str]:
    command = [sys.executable, "-m", "megamem.training.entry", "--config", *configs, "--resume", resume]
    for override in overrides:
        command += ["--set", override]
    return command


def rank_environment(nproc: int) -> dict[str, str]:
    """The supervisor's environment, with the cores shared out; each rank picks DeepSpeed's accelerator itself
    (megamem.training.entry), so the supervisor never imports torch."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env
