"""A free TCP port on this machine, for a rendezvous that megamem starts itself."""
from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10000           # below: well-known and registered services' ports


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out for outgoing connections and port-0 binds (Linux's default if unreadable)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port that is free now and outside the kernel's ephemeral range.

    The port is released before the rendezvous binds it, so something else may
    take it in between. A port the kernel handed out would be taken by the next
    outgoing connection of any process on the machine (one gloo rank opens
    dozens), which made concurrent launches fail with EADDRINUSE; a port below
    the range is never handed out, so only another explicit bind can take it,
    and a random choice among some twenty thousand makes that unlikely.
    """
    low, _ = ephemeral_range()
    candidates = range(LOWEST, low) if low - LOWEST >= 1000 else range(1024, low)
    for port in random.SystemRandom().sample(candidates, min(100, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:                       # every candidate was taken: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
