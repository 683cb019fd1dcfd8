"""The signals that ask a run to stop, and who listens to them.

Clusters and terminals deliver a stop to every process of a job: SLURM signals
all processes of a step (SIGTERM, or SIGUSR1 with `--signal`), and Ctrl-C
signals the whole foreground process group. Only a training rank's main process
acts on one (it finishes the step, saves a checkpoint on every rank and exits
0); the DataLoader workers ignore them, since a worker that died of the signal
would take the rank down before it could save. A second Ctrl-C aborts at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_held():
    """Hold stop signals back while worker processes fork: a child inherits the mask, so none can arrive before the
    child ignores them (ignore_stop_signals); one sent meanwhile reaches this process when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's init: the rank's main process handles the stop, and shuts its workers down itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopRequest:
    """Records the first stop signal for the training loop to act on at the end of its step."""

    def __init__(self):
        self.signal_name: str | None = None
        self.interrupted = False

    def install(self) -> StopRequest:
        """Listen, then take what a launcher held back (megamem.training.supervisor starts ranks with the stop
        signals blocked, so that none dies of one before it listens)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._received)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def request(self, name: str) -> None:
        if self.signal_name is None:
            self.signal_name = name

    def _received(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                print("megamem: second Ctrl-C: aborting now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
            self.interrupted = True
        self.request(signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
