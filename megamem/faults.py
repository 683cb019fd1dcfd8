"""Named points where tests make megamem fail the way real machines do.

`MEGAMEM_FAULT=POINT:ACTION:N` acts the N-th time this process reaches POINT
(`N+`: that time and every time after):
`kill` sends itself SIGKILL (a node losing power, the OOM killer), `enospc`
raises the error a full disk gives, `cut` leaves the first half of the file
being written on disk and then sends SIGKILL (a kill in the middle of a write);
at `loss`, a micro-batch's loss, `nan` makes it not finite and `spike` ten
times larger. The other points sit where a failure is hardest to survive: each
file of a checkpoint (`checkpoint-file`), just before the marker that completes
it (`checkpoint-marker`), and before each file of an old one is removed
(`checkpoint-prune`). Unset, a point costs one environment lookup.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from pathlib import Path

import torch

from megamem.errors import MegamemError

LOSS_FACTORS = {"nan": float("nan"), "spike": 10.0}
ACTIONS = ("kill", "enospc", "cut", *LOSS_FACTORS)
_reached: Counter[str] = Counter()


def _spec() -> tuple[str, str, int, bool] | None:
    text = os.environ.get("MEGAMEM_FAULT")
    if not text:
        return None
    point, _, rest = text.partition(":")
    action, _, nth = rest.partition(":")
    onwards = nth.endswith("+")
    nth = nth.removesuffix("+")
    if action not in ACTIONS or not nth.isdigit():
        raise MegamemError(f"MEGAMEM_FAULT={text}: expected POINT:ACTION:N with ACTION one of {', '.join(ACTIONS)}, "
                           f"e.g. checkpoint-file:kill:3. Fix: correct it, or unset MEGAMEM_FAULT")
    return point, action, int(nth), onwards


def fault_point(name: str) -> str | None:
    """Kills or raises where the fault says so; returns the action when it is the caller's to carry out."""
    spec = _spec()
    if spec is None or spec[0] != name:
        return None
    _reached[name] += 1
    if _reached[name] < spec[2] or (_reached[name] > spec[2] and not spec[3]):
        return None
    if spec[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec[1] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return spec[1]


def cut_short(path: Path) -> None:
    """What the `cut` action does once its file is written: half its bytes stay on disk, then SIGKILL."""
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def with_loss_faults(loss_fn):
    """`loss_fn`, with the `loss` point at each loss it computes for training (with gradients on): evaluation's,
    under no_grad, neither counts nor changes, so N counts training micro-batches in every layout, a pipeline's
    last stage included."""
    def loss(*args):
        value = loss_fn(*args)
        if not torch.is_grad_enabled():
            return value
        action = fault_point("loss")
        return value * LOSS_FACTORS[action] if action else value

    return loss
