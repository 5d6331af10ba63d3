"""The node's check of its path to the gateway's hub (clawnode.connectivity) and the signed
CONNECTIVITY frame that reports it, against the in-memory WireGuard backend (the named test
double; tests/nat/test_hub_discovery.py runs the same check against a real hub)."""

from __future__ import annotations

import pytest
from clawnode import connectivity, wire
from clawnode.backends.memory import FakeBackend
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair

pytestmark = [pytest.mark.unit]

HUB_ENDPOINT = "198.51.100.1:51800"


def wg_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


def desired(identity: Identity, *peers: wire.PeerSpec) -> wire.DesiredState:
    return wire.DesiredState(node_id=identity.node_id, revision=3, peers=peers, issued_at=1)


def hub(key: str) -> wire.PeerSpec:
    return wire.PeerSpec(
        public_key=key,
        allowed_ips=("10.100.0.1/32",),
        kind="mesh",
        ref="hub",
        endpoint=HUB_ENDPOINT,
        persistent_keepalive=25,
    )


class Clock:
    """Time that moves only when the check sleeps; the backend's handshake lands at `at`."""

    def __init__(self, backend: FakeBackend, key: str, at: float | None) -> None:
        self.now = 100.0
        self.backend, self.key, self.at = backend, key, at
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        if self.at is not None and self.now >= 100.0 + self.at:
            self.backend.add_traffic(self.key, 0, 0, handshake_at=1_700_000_000)


@pytest.fixture
def backend() -> FakeBackend:
    fake = FakeBackend("molt0")
    fake.ensure_interface("molt0", bytes(32), 51820, "10.100.48.1/16")
    return fake


def test_a_handshake_with_the_hub_is_reachable_with_the_time_it_took(backend):
    identity, key = Identity.generate(), wg_key()
    backend.set_peer(key, ("10.100.0.1/32",), HUB_ENDPOINT, 25)
    backend.add_traffic(key, 0, 0, handshake_at=1_600_000_000)  # an old session
    clock = Clock(backend, key, at=0.035)
    state = desired(identity, hub(key))

    result = connectivity.check(backend, state, clock=clock, sleep=clock.sleep)

    assert result == connectivity.Result(hub="reachable", hub_rtt_ms=40)  # 10 ms polls
    # The peer was set afresh (its old session gone), exactly as the desired state has it.
    ops = [op for op, peer in backend.calls if peer == key and op in ("remove_peer", "set_peer")]
    assert ops[-2:] == ["remove_peer", "set_peer"]
    peer = backend.peers[key]
    assert (peer.allowed_ips, peer.endpoint, peer.persistent_keepalive) == (
        ("10.100.0.1/32",),
        HUB_ENDPOINT,
        25,
    )


def test_no_handshake_before_the_deadline_is_unreachable_and_says_where(backend):
    identity, key = Identity.generate(), wg_key()
    clock = Clock(backend, key, at=None)

    result = connectivity.check(
        backend, desired(identity, hub(key)), clock=clock, sleep=clock.sleep
    )

    assert result.hub == "unreachable" and result.hub_rtt_ms == 0
    assert HUB_ENDPOINT in result.detail and "5 s" in result.detail
    assert clock.now - 100.0 == pytest.approx(connectivity.HANDSHAKE_TIMEOUT, abs=0.02)


def test_without_a_hub_in_the_desired_state_nothing_is_touched(backend):
    identity, job = Identity.generate(), wg_key()
    job_peer = wire.PeerSpec(public_key=job, allowed_ips=("10.64.0.9/32",), kind="job", ref="o:1")

    result = connectivity.check(backend, desired(identity, job_peer))

    assert result == connectivity.Result(hub="untested", detail=connectivity.NO_HUB)
    assert not [call for call in backend.calls if call[0] in ("set_peer", "remove_peer")]
    assert connectivity.check(backend, None).hub == "untested"


def test_a_device_that_refuses_the_hub_peer_is_unreachable(backend):
    identity, key = Identity.generate(), wg_key()
    backend.refuse[key] = "device says no"

    result = connectivity.check(backend, desired(identity, hub(key)))

    assert result.hub == "unreachable" and "device says no" in result.detail


def test_the_frame_is_signed_by_the_node_and_says_the_peer_node_is_pending():
    identity = Identity.generate()
    result = connectivity.Result(hub="reachable", hub_rtt_ms=42)

    frame = connectivity.frame(identity, result, now=1_700_000_000)

    assert frame["type"] == "connectivity"
    body = wire.open_envelope(frame["envelope"], identity.public_key, wire.CONNECTIVITY)
    report = wire.Connectivity.from_dict(body)
    assert (report.node_id, report.checked_at, report.hub, report.hub_rtt_ms) == (
        identity.node_id,
        1_700_000_000,
        "reachable",
        42,
    )
    assert report.peer == "untested" and "not built yet" in report.detail
    # Signed as a connectivity report only: it cannot be replayed as another kind.
    with pytest.raises(wire.BadSignature):
        wire.open_envelope(frame["envelope"], identity.public_key, wire.SANDBOX_STATUS)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hub": "maybe"}, "hub"),
        ({"hub_rtt_ms": -1}, "hub_rtt_ms"),
        ({"peer": "up"}, "peer"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_malformed_report_is_refused_naming_the_field(change, field):
    body = wire.Connectivity(node_id="nd_" + "0" * 32, checked_at=1, hub="reachable").to_dict()
    with pytest.raises(wire.ProtocolError) as err:
        wire.Connectivity.from_dict({**body, **change})
    assert err.value.field == field


def test_the_probe_waits_out_the_hubs_flood_limit_between_removing_and_setting_the_hub(backend):
    """The hub drops an initiation within 20 ms of the last one it took from this node; the first
    check follows the state that set the hub peer (an initiation) by milliseconds, so the probe
    leaves a gap before its own, or the hub answers nothing for WireGuard's 5 s retry."""
    identity = Identity.generate()
    key = wg_key()
    state = desired(identity, hub(key))
    backend.set_peer(key, ("10.100.0.1/32",), HUB_ENDPOINT, 25)
    events: list[str] = []
    remove, set_peer = backend.remove_peer, backend.set_peer
    backend.remove_peer = lambda *a: (events.append("remove"), remove(*a))[1]
    backend.set_peer = lambda *a: (events.append("set"), set_peer(*a))[1]

    probe = connectivity.start(backend, state, sleep=lambda s: events.append(f"sleep {s}"))

    assert isinstance(probe, connectivity.Probe)
    assert events == ["remove", f"sleep {connectivity.INITIATION_GAP}", "set"]
    assert connectivity.INITIATION_GAP > 0.02
