"""Rendezvous ports (``rlhf.engines.deepspeed_engine.free_port``): drawn below the kernel's
ephemeral range, so an outgoing connection does not take the port between the check and the
process group's listen (EADDRINUSE seen with several runs starting on one machine)."""

from __future__ import annotations

import socket

from rlhf.engines.deepspeed_engine import PORT_RANGE, free_port


def test_free_port_is_in_range_distinct_and_bindable():
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    for p in list(ports)[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_taken_port_is_skipped_and_the_kernel_is_the_fallback(monkeypatch):
    import random

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, a, b: taken)
        p = free_port(tries=3)                     # every draw is the taken port: the kernel picks
        assert p != taken
