"""The agent's pings of its job peers (clawnode.rtt): who is pinged, the signed ROUND_TRIPS frame,
its schema, and the daemon's schedule, which sends the frame only to a gateway whose welcome
accepts it. The pinger is the named double (FakePinger); the ICMP socket itself runs across real
tunnels in tests/netns/test_round_trip.py."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from clawnode import rtt, wire
from clawnode.backends.base import PeerStatus
from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent, Timing
from clawnode.firewall import FakeFirewall
from clawnode.gpu import SimulatedGpuReader
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair
from clawnode.state import Enrollment, StateDir

pytestmark = [pytest.mark.unit]

GATEWAY = Identity.from_seed(bytes(range(100, 132)))
MESH = "10.100.128.1"
NOW = 1_700_000_000


def wg_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


def job(key: str, address: str, ref: str) -> wire.PeerSpec:
    return wire.PeerSpec(key, (f"{address}/32",), "job", ref)


def state(identity: Identity, *peers: wire.PeerSpec, revision: int = 1) -> wire.DesiredState:
    return wire.DesiredState(
        node_id=identity.node_id, revision=revision, peers=peers, issued_at=int(time.time())
    )


# -- who is pinged ---------------------------------------------------------------------------


def test_only_job_peers_with_a_live_session_are_targets():
    identity = Identity.generate()
    live, stale, never, hub = wg_key(), wg_key(), wg_key(), wg_key()
    desired = state(
        identity,
        job(live, "10.64.0.7", "order:7"),
        job(stale, "10.64.0.8", "order:8"),
        job(never, "10.64.0.9", "order:9"),
        wire.PeerSpec(hub, ("10.100.0.1/32",), "mesh", "hub"),
    )
    device = {
        live: PeerStatus(live, ("10.64.0.7/32",), last_handshake=NOW - 170),
        stale: PeerStatus(stale, ("10.64.0.8/32",), last_handshake=NOW - 181),
        never: PeerStatus(never, ("10.64.0.9/32",)),
        hub: PeerStatus(hub, ("10.100.0.1/32",), last_handshake=NOW),
    }

    assert rtt.targets(desired, device, NOW) == [rtt.Target(live, "order:7", "10.64.0.7")]
    assert rtt.targets(None, device, NOW) == []
    # A desired peer the device lacks (not added yet) is not pinged either.
    assert rtt.targets(desired, {}, NOW) == []


def test_a_round_reports_each_peer_answered_with_microseconds_or_no_answer():
    one, two = wg_key(), wg_key()
    found = [rtt.Target(one, "order:1", "10.64.0.1"), rtt.Target(two, "order:2", "10.64.0.2")]
    pinger = rtt.FakePinger({"10.64.0.1": 0.0234567})

    results = rtt.measure(pinger, MESH, found, timeout=1.5)

    assert pinger.rounds == [(MESH, ("10.64.0.1", "10.64.0.2"), 1.5)]
    assert results == [
        wire.RoundTrip(one, "order:1", answered=True, rtt_us=23457),
        wire.RoundTrip(two, "order:2", answered=False),
    ]
    # A reply faster than a microsecond is still an answer.
    assert rtt.measure(rtt.FakePinger({"10.64.0.1": 1e-9}), MESH, found[:1])[0].rtt_us == 1
    assert rtt.measure(pinger, MESH, []) == [] and len(pinger.rounds) == 1  # nothing to ping


def test_the_frame_is_signed_by_the_node_as_round_trips_only():
    identity = Identity.generate()
    key = wg_key()
    results = [wire.RoundTrip(key, "order:1", answered=True, rtt_us=800)]

    frame = rtt.frame(identity, results, now=NOW)

    assert frame["type"] == "round_trips"
    body = wire.open_envelope(frame["envelope"], identity.public_key, wire.ROUND_TRIPS)
    report = wire.RoundTrips.from_dict(body)
    assert (report.node_id, report.measured_at, report.peers) == (
        identity.node_id,
        NOW,
        tuple(results),
    )
    with pytest.raises(wire.BadSignature):
        wire.open_envelope(frame["envelope"], identity.public_key, wire.CONNECTIVITY)


# -- the schema ------------------------------------------------------------------------------


def _body() -> dict[str, Any]:
    peer = wire.RoundTrip(wg_key(), "order:1", answered=True, rtt_us=500)
    return wire.RoundTrips(node_id="nd_" + "0" * 32, measured_at=NOW, peers=(peer,)).to_dict()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda body: body.update(extra=1), "extra"),
        (lambda body: body.update(measured_at=-1), "measured_at"),
        (lambda body: body["peers"][0].update(extra=1), "peers[0].extra"),
        (lambda body: body["peers"][0].update(public_key="nope"), "peers[0].public_key"),
        (lambda body: body["peers"][0].update(answered="yes"), "peers[0].answered"),
        (lambda body: body["peers"][0].update(rtt_us=10_000_001), "peers[0].rtt_us"),
        (lambda body: body["peers"][0].update(rtt_us=0), "peers[0].rtt_us"),
        (lambda body: body["peers"][0].update(answered=False), "peers[0].rtt_us"),
        (lambda body: body["peers"][0].update(rtt_us=1.5), "peers[0].rtt_us"),
        (lambda body: body["peers"][0].pop("ref"), "peers[0].ref"),
    ],
)
def test_a_malformed_round_trips_body_is_refused_naming_the_field(change, field):
    body = _body()
    wire.RoundTrips.from_dict(body)  # the control: as made, it parses
    change(body)
    with pytest.raises(wire.ProtocolError) as err:
        wire.RoundTrips.from_dict(body)
    assert err.value.field == field


# -- the ICMP packets ------------------------------------------------------------------------


def test_an_echo_request_carries_a_valid_checksum_and_a_reply_is_matched_by_its_fields():
    packet = rtt.echo_request(0xBEEF, 7)
    assert packet[0] == 8 and struct.unpack("!HH", packet[4:8]) == (0xBEEF, 7)
    assert rtt._checksum(packet) == 0  # a packet with its checksum sums to zero

    reply = bytes([0]) + packet[1:]  # the same ICMP message as an echo reply
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(reply), 0, 0, 64, socket.IPPROTO_ICMP, 0,
        socket.inet_aton("10.64.0.7"), socket.inet_aton(MESH),
    )  # fmt: skip
    assert rtt.parse_reply(ip + reply) == ("10.64.0.7", 0xBEEF, 7)
    assert rtt.parse_reply(ip + packet) is None  # a request is no reply
    assert rtt.parse_reply(ip[:10]) is None


# -- the daemon's schedule -------------------------------------------------------------------


class Connection:
    """A gateway connection: a challenge, then `frames`; after them the connection stays open
    until `until` holds (or two seconds pass), then closes. `after` runs once the frames are
    taken (the desired state is applied by then)."""

    def __init__(self, frames, until, after=lambda: None) -> None:
        self.frames, self.until, self.after = frames, until, after
        self.sent: list[dict[str, Any]] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def recv(self) -> str:
        return json.dumps({"type": "challenge", "challenge": "c" * 43})

    async def __aiter__(self) -> Any:
        for frame in self.frames:
            yield json.dumps(frame)
        self.after()
        deadline = time.monotonic() + 2.0
        while not self.until(self) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.sent if frame["type"] == kind]


def agent(
    tmp_path: Path, identity: Identity, backend: FakeBackend, pinger, said: list[str]
) -> Agent:
    enrollment = Enrollment(
        gateway="http://127.0.0.1:9",
        node_id=identity.node_id,
        name="node-1",
        mesh_address=MESH,
        gateway_public_key=GATEWAY.public_key_b64,
        websocket_url="ws://127.0.0.1:9/ws/agent/",
        backend="userspace",
    )
    made = Agent(
        state=StateDir(tmp_path),
        enrollment=enrollment,
        identity=identity,
        backend=backend,
        firewall=FakeFirewall(),
        gpus=SimulatedGpuReader("RTX 4090:1"),
        pinger=pinger,
        timing=Timing(round_trips=0.05, connectivity=3600),
        say=said.append,
    )
    made.bring_up()
    return made


def session(
    tmp_path: Path, accepts: list[str], pinger, rounds: int = 2, said: list[str] | None = None
) -> tuple[Connection, Any]:
    """One session: welcome (with `accepts`), a desired state of a live and a silent job peer
    and one with no session; open until `rounds` ROUND_TRIPS frames were sent (or 2 s)."""
    identity = Identity.from_seed(bytes(range(32)))
    backend = FakeBackend()
    node = agent(tmp_path, identity, backend, pinger, said if said is not None else [])
    live, silent, idle = wg_key(), wg_key(), wg_key()
    desired = state(
        identity,
        job(live, "10.64.0.1", "order:1"),
        job(silent, "10.64.0.2", "order:2"),
        job(idle, "10.64.0.3", "order:3"),
    )

    def handshakes() -> None:
        backend.add_traffic(live, 10, 10)
        backend.add_traffic(silent, 10, 10)

    ws = Connection(
        [
            {"type": "welcome", "name": "node-1", "accepts": accepts},
            {
                "type": "desired_state",
                "envelope": wire.signed_envelope(wire.DESIRED_STATE, desired.to_dict(), GATEWAY),
            },
        ],
        until=lambda conn: len(conn.of("round_trips")) >= rounds,
        after=handshakes,
    )
    asyncio.run(node._session(ws, asyncio.Event()))
    return ws, (identity, live, silent)


def test_the_agent_pings_its_live_peers_each_period_and_reports_them_signed(tmp_path):
    pinger = rtt.FakePinger({"10.64.0.1": 0.012})

    ws, (identity, live, silent) = session(tmp_path, ["connectivity", "round_trips"], pinger)

    frames = ws.of("round_trips")
    assert len(frames) >= 2  # a round, then another after the period
    body = wire.open_envelope(frames[-1]["envelope"], identity.public_key, wire.ROUND_TRIPS)
    report = wire.RoundTrips.from_dict(body)
    assert report.node_id == identity.node_id
    assert sorted(report.peers, key=lambda p: p.ref) == [
        wire.RoundTrip(live, "order:1", answered=True, rtt_us=12000),
        wire.RoundTrip(silent, "order:2", answered=False),
    ]
    # From the mesh address, the idle peer (no session) never pinged.
    assert {source for source, _, _ in pinger.rounds} == {MESH}
    assert {address for _, pinged, _ in pinger.rounds for address in pinged} == {
        "10.64.0.1",
        "10.64.0.2",
    }


def test_a_gateway_that_does_not_accept_the_frame_never_gets_it_and_nothing_is_pinged(tmp_path):
    pinger = rtt.FakePinger({"10.64.0.1": 0.012})

    ws, _ = session(tmp_path, ["connectivity"], pinger, rounds=1)

    assert ws.of("welcome") == [] and ws.of("ack")  # the session ran: the state was applied
    assert ws.of("round_trips") == [] and pinger.rounds == []


def test_an_agent_without_a_pinger_sends_nothing(tmp_path):
    ws, _ = session(tmp_path, ["round_trips"], None, rounds=1)

    assert ws.of("ack") and ws.of("round_trips") == []


class BrokenPinger:
    """A pinger whose socket cannot be opened (an agent without CAP_NET_RAW)."""

    def __init__(self) -> None:
        self.rounds = 0

    def ping_all(self, source, targets, timeout):
        self.rounds += 1
        raise PermissionError(1, "Operation not permitted")


def test_a_pinger_that_fails_costs_the_round_not_the_session(tmp_path):
    pinger, said = BrokenPinger(), []

    ws, _ = session(tmp_path, ["round_trips"], pinger, rounds=1, said=said)

    assert pinger.rounds >= 2  # the task kept going, round after round
    assert ws.of("round_trips") == [] and ws.of("ack")
    # Said once, not every round: an agent without CAP_NET_RAW never gets it.
    assert said.count("round trips not measured: [Errno 1] Operation not permitted") == 1
