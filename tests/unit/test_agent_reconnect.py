"""The agent's reconnect backoff: exponential, capped, and jittered, so the agents a gateway
restart drops all at once do not come back in lockstep."""

from __future__ import annotations

import asyncio
import random
import statistics

import clawnode.daemon
import pytest
from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent, Timing, reconnect_wait
from clawnode.firewall import FakeFirewall
from clawnode.gpu import SimulatedGpuReader
from clawnode.keys import Identity
from clawnode.state import Enrollment, StateDir

pytestmark = [pytest.mark.unit]


def test_each_wait_is_the_backoff_times_a_factor_between_half_and_one_and_a_half():
    assert reconnect_wait(2.0, lambda: 0.0) == 1.0
    assert reconnect_wait(2.0, lambda: 0.999) == pytest.approx(2.998)
    rng = random.Random(7)
    waits = [reconnect_wait(4.0, rng.random) for _ in range(1000)]
    assert all(2.0 <= w < 6.0 for w in waits)


def test_two_thousand_agents_dropped_at_once_come_back_spread_out():
    """The first retry of 2,000 agents (backoff 0.5 s): spread over about half a second, no
    instant (10 ms) holding more than a few percent of them."""
    rng = random.Random(2026)
    waits = [reconnect_wait(Timing().backoff_initial, rng.random) for _ in range(2000)]
    assert max(waits) - min(waits) > 0.45
    assert statistics.pstdev(waits) > 0.1
    busiest = max(
        sum(1 for w in waits if slot * 0.01 <= w < (slot + 1) * 0.01) for slot in range(100)
    )
    assert busiest < 2000 * 0.05


def test_the_agent_doubles_its_backoff_up_to_the_cap_and_draws_every_wait(tmp_path, monkeypatch):
    """The real connection loop, with a gateway that never answers: each retry waits on the
    backoff 0.5, 1, 2, ... up to the cap, through reconnect_wait (the jitter)."""
    identity = Identity.generate()
    enrollment = Enrollment(
        gateway="http://127.0.0.1:9",
        node_id=identity.node_id,
        name="node-1",
        mesh_address="10.100.128.1",
        gateway_public_key=Identity.generate().public_key_b64,
        websocket_url="ws://127.0.0.1:9/ws/agent/",
        backend="userspace",
    )
    agent = Agent(
        state=StateDir(tmp_path),
        enrollment=enrollment,
        identity=identity,
        backend=FakeBackend(),
        firewall=FakeFirewall(),
        gpus=SimulatedGpuReader("RTX 4090:1"),
        timing=Timing(backoff_initial=0.5, backoff_max=4.0),
        say=lambda line: None,
    )
    asked: list[float] = []
    stop = asyncio.Event()

    def refuse(*args, **kwargs):
        raise OSError("connection refused")

    def wait(backoff: float) -> float:
        asked.append(backoff)
        if len(asked) == 7:
            stop.set()
        return 0.0

    monkeypatch.setattr(clawnode.daemon.websockets, "connect", refuse)
    monkeypatch.setattr(clawnode.daemon, "reconnect_wait", wait)
    asyncio.run(agent.run(stop))
    assert asked == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
