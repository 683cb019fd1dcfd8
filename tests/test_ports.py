"""megamem.ports: the port a rendezvous binds is free and never one the kernel hands to outgoing connections."""
from __future__ import annotations

import socket

from megamem import ports


def test_free_ports_bind_and_lie_below_the_ephemeral_range():
    low, high = ports.ephemeral_range()
    assert ports.LOWEST < low <= high
    chosen = {ports.free_port() for _ in range(20)}
    assert len(chosen) > 1                                   # chosen at random, not one port for every launch
    for port in chosen:
        assert ports.LOWEST <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_not_chosen(monkeypatch):
    """With a range too narrow to keep above ports.LOWEST, the candidates are the two ports above 1023."""
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1026, 60999))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 1024))
        taken.listen()
        assert {ports.free_port() for _ in range(30)} == {1025}
