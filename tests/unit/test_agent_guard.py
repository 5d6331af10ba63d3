"""meshnet.agent_guard on its own: frame sizes and depth, per-address counters, per-node token
buckets (on a fake clock), and a real agent's traffic over simulated hours never limited."""

from __future__ import annotations

import json
import secrets

import pytest
from clawnode import frames, wire
from clawnode.daemon import Timing
from clawnode.keys import Identity

from meshnet import agent_guard
from meshnet.agent_channel import AgentRefused
from meshnet.agent_guard import ConnectionGuard, parse_frame, within_depth

pytestmark = [pytest.mark.unit]


@pytest.fixture(autouse=True)
def fresh():
    agent_guard.reset()
    yield
    agent_guard.reset()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(agent_guard.time, "monotonic", clock)
    return clock


def text(frame) -> dict:
    return {"type": "websocket.receive", "text": json.dumps(frame)}


def refused(call) -> AgentRefused:
    with pytest.raises(AgentRefused) as caught:
        call()
    return caught.value


def test_the_real_auth_frame_fits_the_pre_auth_limit_many_times_over(settings):
    size = len(json.dumps(frames.auth(Identity.generate(), secrets.token_urlsafe(32))))
    assert size < 400
    assert 8 * size <= settings.MOLT_AGENT_PREAUTH_MAX_BYTES


def test_size_is_checked_on_the_raw_text_before_any_parsing(settings):
    settings.MOLT_AGENT_PREAUTH_MAX_BYTES = 4096
    settings.MOLT_AGENT_MAX_FRAME_BYTES = 1 << 20
    guard = ConnectionGuard("198.51.100.1")
    # Not JSON at all, and still refused for its size (1009), not as a bad message.
    exc = refused(lambda: guard.frame({"text": "x" * 4097}))
    assert exc.close_code == wire.CLOSE_TOO_BIG == 1009
    assert "before auth" in str(exc)
    # Bytes, not characters: 2,000 two-byte characters are 4,000 bytes... and 2,100 are over.
    assert agent_guard.frame_text({"text": "é" * 2000}, authenticated=False)
    assert refused(lambda: guard.frame({"text": "é" * 2100})).close_code == wire.CLOSE_TOO_BIG
    guard.node_id = "nd_" + "0" * 32
    assert guard.frame(text({"type": "heartbeat", "pad": "x" * 100_000}))["type"] == "heartbeat"
    big = {"text": "x" * ((1 << 20) + 1)}
    exc = refused(lambda: guard.frame(big))
    assert exc.close_code == wire.CLOSE_TOO_BIG and "before auth" not in str(exc)


@pytest.mark.parametrize(
    "message, detail",
    [
        ({"bytes": b"\x00" * 10}, "binary"),
        ({"text": "{not json"}, "not JSON"),
        ({"text": "[1, 2]"}, "objects with a type"),
        ({"text": '{"type": 3}'}, "objects with a type"),
        ({"text": "[" * 1500 + "]" * 1500}, "nested deeper"),  # RecursionError in the parser
        ({"text": '{"type": "heartbeat", "x": ' + "[" * 40 + "]" * 40 + "}"}, "nested deeper"),
    ],
)
def test_bad_frames_are_refused_with_4400(message, detail):
    exc = refused(lambda: ConnectionGuard("a").frame(message))
    assert exc.close_code == wire.CLOSE_BAD_MESSAGE
    assert detail in str(exc)


def test_depth_is_counted_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert not within_depth(deep, 32)
    assert within_depth({"a": [{"b": [1, 2]}]}, 4)
    assert not within_depth({"a": [{"b": [1, 2]}]}, 3)


def test_frames_of_the_protocol_are_nowhere_near_the_depth_limit():
    identity = Identity.generate()
    report = wire.SandboxReport(ref="order:1", state="ready", ports=(8888,))
    frame = frames.sandbox_status(identity, [report], full=True)
    assert parse_frame(json.dumps(frame)) == frame


def test_sockets_per_address_are_capped_unauthenticated_and_in_all(settings):
    settings.MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS = 2
    settings.MOLT_AGENT_CONNECTIONS_PER_ADDRESS = 3
    first, second = ConnectionGuard("203.0.113.5"), ConnectionGuard("203.0.113.5")
    first.admit()
    second.admit()
    third = ConnectionGuard("203.0.113.5")
    assert refused(third.admit).close_code == wire.CLOSE_TRY_LATER == 1013
    third.release()
    other = ConnectionGuard("203.0.113.6")
    other.admit()  # another address has its own count
    first.authenticated("nd_" + "1" * 32)
    again = ConnectionGuard("203.0.113.5")
    again.admit()  # one authenticated, two not: three in all
    fourth = ConnectionGuard("203.0.113.5")
    assert refused(fourth.admit).close_code == wire.CLOSE_TRY_LATER  # four in all
    fourth.release()
    fourth.release()  # idempotent: counted down once
    for guard in (first, second, again, other):
        guard.release()
    assert not agent_guard._total and not agent_guard._unauthenticated


def test_zero_means_no_cap(settings):
    settings.MOLT_AGENT_UNAUTHENTICATED_PER_ADDRESS = 0
    settings.MOLT_AGENT_CONNECTIONS_PER_ADDRESS = 0
    for _ in range(5000):
        ConnectionGuard("a").admit()


def test_the_address_is_the_http_limits_one(settings):
    scope = {"client": ("10.0.0.2", 5555), "headers": [(b"x-forwarded-for", b"1.2.3.4, 9.9.9.9")]}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 0}
    assert agent_guard.scope_address(scope) == "10.0.0.2"  # no trusted proxy: the peer
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    assert agent_guard.scope_address(scope) == "9.9.9.9"  # the hop the one proxy appended
    assert agent_guard.scope_address({"client": ("10.0.0.3", 1), "headers": []}) == "10.0.0.3"


def authenticated_guard() -> ConnectionGuard:
    guard = ConnectionGuard("198.51.100.9")
    guard.admit()
    guard.authenticated("nd_" + "2" * 32)
    return guard


def test_a_heartbeat_flood_is_dropped_then_closed(clock):
    guard = authenticated_guard()
    passed = [guard.frame(text({"type": "heartbeat"})) for _ in range(agent_guard.MAX_DROPS + 9)]
    assert sum(frame is not None for frame in passed) == agent_guard.RATES["heartbeat"].burst
    exc = refused(lambda: guard.frame(text({"type": "heartbeat"})))
    assert exc.close_code == wire.CLOSE_RATE_LIMITED == 4429


def test_the_bucket_refills_with_time(clock):
    guard = authenticated_guard()
    for _ in range(10):
        assert guard.frame(text({"type": "heartbeat"})) is not None
    assert guard.frame(text({"type": "heartbeat"})) is None
    clock.now += 1.0
    assert guard.frame(text({"type": "heartbeat"})) is not None


@pytest.mark.parametrize("kind", ["metering", "ack", "removed", "sandbox_status"])
def test_kinds_that_carry_signed_facts_close_at_once_over_their_rate(kind, clock):
    guard = authenticated_guard()
    group = agent_guard.KIND_BUCKET[kind]
    for _ in range(int(agent_guard.RATES[group].burst)):
        assert guard.frame(text({"type": kind})) is not None
    assert refused(lambda: guard.frame(text({"type": kind}))).close_code == 4429


def test_a_reconnect_does_not_refill_the_buckets(clock):
    guard = authenticated_guard()
    for _ in range(10):
        guard.frame(text({"type": "heartbeat"}))
    guard.release()
    assert authenticated_guard().frame(text({"type": "heartbeat"})) is None


def test_the_rate_factor_scales_every_bucket(clock, settings):
    settings.MOLT_AGENT_RATE_FACTOR = 3
    guard = authenticated_guard()
    passed = [guard.frame(text({"type": "heartbeat"})) for _ in range(40)]
    assert sum(frame is not None for frame in passed) == 30


def test_a_real_agent_is_never_limited_over_hours_with_reconnects_and_push_bursts(clock):
    """clawnode's own periods (Timing()) for six simulated hours: a reconnect (welcome burst:
    final counters, inventory, full sandbox report, heartbeat) every ten minutes, and every
    hour a burst of 40 desired states pushed at once (an ack, a full sandbox report and a
    removal round each, with its metering sample and removed frame), a sandbox report every
    second for a minute after each burst (sandboxes starting)."""
    t = Timing()
    guard = authenticated_guard()
    sent = 0

    def send(kind: str) -> None:
        nonlocal sent
        sent += 1
        assert guard.frame(text({"type": kind})) is not None, (kind, clock.now)

    start = clock.now
    next_beat = next_meter = next_inventory = start
    for second in range(6 * 3600):
        clock.now = start + second
        if second % 600 == 0:  # reconnect: same node, new socket, buckets kept
            guard.release()
            guard = authenticated_guard()
            for kind in ("heartbeat", "metering", "inventory", "sandbox_status"):
                send(kind)
        if second % 3600 == 1800:
            for _ in range(40):
                for kind in ("ack", "sandbox_status", "metering", "removed"):
                    send(kind)
        if 1800 < second % 3600 <= 1860:
            send("sandbox_status")
        if clock.now >= next_beat:
            send("heartbeat")
            next_beat += t.heartbeat
        if clock.now >= next_meter:
            send("metering")
            next_meter += t.metering
        if clock.now >= next_inventory:
            send("inventory")
            next_inventory += t.inventory
    assert guard.drops == 0
    assert sent > 6000
