"""The relay's pure parts: WireGuard messages as a keyless relay reads them (meshnet.relay.wgmsg),
where each side of a pair is and what may move it (meshnet.relay.pairs), and the fast path's
ruleset (meshnet.relay.fastpath), and the relay's refresh of its pairs on loopback sockets.
Real tunnels through the relay: tests/nat/test_relay.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct

import pytest
from nacl.public import PrivateKey

from meshnet.relay import fastpath, pairs, wgmsg

pytestmark = pytest.mark.unit

BUYER_AT = ("198.51.100.7", 51821)
PROVIDER_AT = ("203.0.113.9", 51820)
ATTACKER_AT = ("198.51.100.66", 4444)


def _key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


BUYER_KEY, PROVIDER_KEY = _key(), _key()


def _mac1(body: bytes, to_key: str) -> bytes:
    # WireGuard's definition, written out here independently of wgmsg: mac1 = MAC(HASH("mac1----"
    # || recipient's public key), message up to mac1), BLAKE2s with a 16-byte output.
    key = hashlib.blake2s(b"mac1----" + base64.b64decode(to_key)).digest()
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


def initiation(sender: int, to_key: str) -> bytes:
    body = struct.pack("<II", 1, sender) + os.urandom(32 + 48 + 28)
    return body + _mac1(body, to_key) + bytes(16)


def response(sender: int, receiver: int, to_key: str) -> bytes:
    body = struct.pack("<III", 2, sender, receiver) + os.urandom(32 + 16)
    return body + _mac1(body, to_key) + bytes(16)


def data(receiver: int, size: int = 64, counter: int = 7) -> bytes:
    return struct.pack("<IIQ", 4, receiver, counter) + os.urandom(size - 16)


def test_parse_takes_only_wireguard_messages():
    assert wgmsg.parse(initiation(5, PROVIDER_KEY)) == wgmsg.Message(1, 5, None)
    assert wgmsg.parse(response(6, 5, BUYER_KEY)) == wgmsg.Message(2, 6, 5)
    assert wgmsg.parse(data(9)) == wgmsg.Message(4, None, 9)
    assert wgmsg.parse(struct.pack("<II", 3, 9) + bytes(56)) == wgmsg.Message(3, None, 9)
    # Padded to 16 but never past the MTU: a full-size message is 1452 bytes at MTU 1420.
    assert wgmsg.parse(data(9, 1452)) == wgmsg.Message(4, None, 9)
    assert wgmsg.parse(data(9)[:31]) is None  # shorter than header, counter and tag
    assert wgmsg.parse(initiation(5, PROVIDER_KEY)[:-1]) is None
    assert wgmsg.parse(b"\x05\0\0\0" + bytes(60)) is None
    assert wgmsg.parse(b"\x01\x01\0\0" + bytes(144)) is None  # reserved bytes not zero
    assert wgmsg.parse(b"GET / HTTP/1.1\r\n") is None


def test_mac1_is_checked_against_the_recipients_public_key():
    message = initiation(5, PROVIDER_KEY)
    assert wgmsg.mac1_valid(message, wgmsg.mac1_key(PROVIDER_KEY))
    assert not wgmsg.mac1_valid(message, wgmsg.mac1_key(BUYER_KEY))
    assert wgmsg.mac1_valid(data(3), wgmsg.mac1_key(BUYER_KEY))  # no mac1 on transport


def _pair() -> pairs.Pair:
    return pairs.Pair(pairs.Allocation("p", 40000, 40001, BUYER_KEY, PROVIDER_KEY))


def _handshake(pair, *, buyer_at=BUYER_AT, provider_at=PROVIDER_AT, index=11):
    """The provider's keepalive-driven initiation first (dropped: nobody to send it to), then
    the buyer's initiation and the provider's response."""
    pair.receive(pairs.PROVIDER, provider_at, initiation(99, BUYER_KEY), 0.0)
    to, _ = pair.receive(pairs.BUYER, buyer_at, initiation(index, PROVIDER_KEY), 0.1)
    assert to == provider_at
    to, _ = pair.receive(pairs.PROVIDER, provider_at, response(12, index, BUYER_KEY), 0.2)
    assert to == buyer_at


def test_a_handshake_through_the_relay_places_both_sides_and_data_flows():
    pair = _pair()
    to, changed = pair.receive(pairs.PROVIDER, PROVIDER_AT, initiation(99, BUYER_KEY), 0.0)
    assert (to, changed) == (None, True)  # the buyer is not known yet: dropped
    _handshake(pair)
    assert pair.handshaken
    assert pair.receive(pairs.BUYER, BUYER_AT, data(12), 1.0) == (PROVIDER_AT, False)
    assert pair.receive(pairs.PROVIDER, PROVIDER_AT, data(11), 1.0) == (BUYER_AT, False)
    assert pair.counters.forwarded == {1: 1, 2: 1, 3: 0, 4: 2}


def test_garbage_and_wrong_mac1_are_dropped():
    pair = _pair()
    _handshake(pair)
    dropped = pair.counters.dropped
    # An initiation made for the buyer's key arriving on the buyer's port is not for the
    # provider: a stranger's guess, dropped.
    assert pair.receive(pairs.BUYER, ATTACKER_AT, initiation(7, BUYER_KEY), 1.0) == (None, False)
    assert pair.receive(pairs.BUYER, BUYER_AT, b"plain text", 1.0) == (None, False)
    assert pair.counters.dropped == dropped + 2


def test_data_from_a_new_source_naming_no_session_of_the_relay_is_dropped_and_moves_nothing():
    pair = _pair()
    _handshake(pair)  # the buyer's data names 12 (the provider's index), the provider's 11
    dropped = pair.counters.dropped
    # An index the relay saw no handshake make, and the other side's index (the provider's
    # data names 11, never the buyer's): dropped, nothing moves.
    for wrong in (13, 11):
        assert pair.receive(pairs.BUYER, ATTACKER_AT, data(wrong), 1.0) == (None, False)
    assert pair.receive(pairs.PROVIDER, ATTACKER_AT, data(12), 1.0) == (None, False)
    # A cookie reply from a new source never moves a side.
    cookie = struct.pack("<II", 3, 12) + bytes(56)
    assert pair.receive(pairs.BUYER, ATTACKER_AT, cookie, 1.0) == (None, False)
    assert pair.sides[pairs.BUYER].address == BUYER_AT
    assert pair.sides[pairs.PROVIDER].address == PROVIDER_AT
    assert pair.counters.moved == 0 and pair.counters.dropped == dropped + 4


def test_a_provider_whose_address_changed_is_followed_on_its_next_packet_of_the_session():
    """A provider's home router reboots onto a new address: its next packet (its keepalive)
    comes from there, naming the session made through the relay, and moves it at once."""
    pair = _pair()
    _handshake(pair)
    assert pair.receive(pairs.PROVIDER, PROVIDER_AT, data(11, counter=0), 1.0) == (BUYER_AT, False)
    rebooted = ("203.0.113.77", 40123)
    to, changed = pair.receive(pairs.PROVIDER, rebooted, data(11, 32, counter=1), 30.0)
    assert (to, changed) == (BUYER_AT, True)
    assert pair.sides[pairs.PROVIDER].address == rebooted
    assert pair.counters.moved == 1
    # The buyer's packets go there now; a late copy from the old address moves nothing back.
    assert pair.receive(pairs.BUYER, BUYER_AT, data(12), 30.1) == (rebooted, False)
    assert pair.receive(pairs.PROVIDER, PROVIDER_AT, data(11, counter=1), 30.2) == (None, False)
    assert pair.sides[pairs.PROVIDER].address == rebooted


def test_a_copy_of_a_packet_already_seen_moves_nothing():
    pair = _pair()
    _handshake(pair)
    for counter in range(5):
        pair.receive(pairs.BUYER, BUYER_AT, data(12, counter=counter), 1.0)
    # Copies of what the relay forwarded, sent from elsewhere: not a later packet of the
    # session, dropped; the buyer stays.
    for counter in (0, 4):
        assert pair.receive(pairs.BUYER, ATTACKER_AT, data(12, counter=counter), 2.0) == (
            None,
            False,
        )
    assert pair.sides[pairs.BUYER].address == BUYER_AT
    # The buyer's own next packet from a new port moves it.
    moved = ("198.51.100.7", 60001)
    assert pair.receive(pairs.BUYER, moved, data(12, counter=5), 3.0) == (PROVIDER_AT, True)


def test_the_sessions_of_the_latest_handshakes_are_followed_and_older_ones_forgotten():
    pair = _pair()
    _handshake(pair, index=11)  # provider's index 12
    # Two rekeys: the buyer initiates with 21 and 31, the provider answers with 22 and 32.
    for initiator, responder in ((21, 22), (31, 32), (41, 42)):
        pair.receive(pairs.BUYER, BUYER_AT, initiation(initiator, PROVIDER_KEY), 1.0)
        pair.receive(pairs.PROVIDER, PROVIDER_AT, response(responder, initiator, BUYER_KEY), 1.1)
    assert list(pair.sides[pairs.BUYER].sessions) == [22, 32, 42]
    assert list(pair.sides[pairs.PROVIDER].sessions) == [21, 31, 41]
    # The first session is past WireGuard's three keypairs: its data moves nothing.
    assert pair.receive(pairs.BUYER, ATTACKER_AT, data(12), 2.0) == (None, False)
    # The previous keypair's data still arrives from the side's new address.
    moved = ("198.51.100.7", 60002)
    assert pair.receive(pairs.BUYER, moved, data(32), 2.0) == (PROVIDER_AT, True)


def test_an_initiation_from_a_new_source_moves_the_side_only_when_answered():
    pair = _pair()
    _handshake(pair)
    # A stranger (or a replay) sends an initiation: forwarded (the provider will refuse it) but
    # the buyer stays where it handshook; the provider answers nothing that names its index.
    to, changed = pair.receive(pairs.BUYER, ATTACKER_AT, initiation(50, PROVIDER_KEY), 1.0)
    assert (to, changed) == (PROVIDER_AT, False)
    assert pair.sides[pairs.BUYER].address == BUYER_AT
    # A response that names an index nobody initiated with, from elsewhere: dropped.
    assert pair.receive(pairs.PROVIDER, ATTACKER_AT, response(1, 77, BUYER_KEY), 1.0) == (
        None,
        False,
    )
    # The buyer's NAT rebinds: its next handshake from the new port is answered, and the buyer
    # is there from then on (before the response is forwarded, so the response reaches it).
    moved = ("198.51.100.7", 60000)
    pair.receive(pairs.BUYER, moved, initiation(51, PROVIDER_KEY), 2.0)
    to, changed = pair.receive(pairs.PROVIDER, PROVIDER_AT, response(13, 51, BUYER_KEY), 2.1)
    assert (to, changed) == (moved, True)
    assert pair.sides[pairs.BUYER].address == moved
    assert pair.counters.moved == 1


def test_unanswered_initiations_are_forgotten():
    pair = _pair()
    _handshake(pair)
    for index in range(100):
        pair.receive(pairs.BUYER, ATTACKER_AT, initiation(1000 + index, PROVIDER_KEY), 3.0)
    assert len(pair.sides[pairs.BUYER].pending) == pairs.PENDING_MAX
    # Too old to be answered: a late response does not move the buyer.
    _, changed = pair.receive(pairs.PROVIDER, PROVIDER_AT, response(14, 1099, BUYER_KEY), 63.0)
    assert pair.sides[pairs.BUYER].address == BUYER_AT
    assert not changed


def test_an_allocation_is_checked():
    with pytest.raises(ValueError):
        pairs.Allocation.from_dict(
            {"id": 1, "buyer_port": 40000, "provider_port": 40000, "buyer_key": BUYER_KEY,
             "provider_key": PROVIDER_KEY}
        )  # fmt: skip
    with pytest.raises(ValueError):
        pairs.Allocation.from_dict(
            {"id": 1, "buyer_port": 40000, "provider_port": 40001, "buyer_key": "short",
             "provider_key": PROVIDER_KEY}
        )  # fmt: skip


def test_the_fast_path_forwards_exactly_the_known_endpoints():
    route = fastpath.Route(7, 40000, 40001, BUYER_AT, PROVIDER_AT)
    text = fastpath.ruleset("192.0.2.30", (40000, 40999), [route])
    # Transport data only (the payload's first byte, WireGuard's type): handshakes, even from
    # the known addresses, go to Python, which learns each session from them.
    assert (
        "ip saddr 198.51.100.7 udp sport 51821 udp dport 40000 @th,64,8 4 ct zone set 7 accept"
        in text
    )
    assert "ip saddr 203.0.113.9 udp sport 51820 udp dport 40001 @th,64,8 4 ct zone set 7" in text
    assert "dnat to 203.0.113.9:51820" in text and "snat to 192.0.2.30:40001" in text
    assert "dnat to 198.51.100.7:51821" in text and "snat to 192.0.2.30:40000" in text
    # Everything else to the relay's ports stays out of conntrack, so it reaches Python.
    assert text.index("ct zone set 7 accept") < text.index("    notrack")
    # No route: no dnat at all, and the host forwards nothing.
    empty = fastpath.ruleset("192.0.2.30", (40000, 40999), [])
    assert "dnat to" not in empty and "policy drop" in empty


def test_a_freed_pairs_ports_are_opened_at_once_for_the_pair_that_takes_them(unused_udp_ports):
    # The gateway hands a stopped order's relay ports to the next relayed order at once, so one
    # refresh can close a pair and open another on the same two ports.
    from meshnet.relay.server import Relay

    low, high = unused_udp_ports
    first = pairs.Allocation("1", low, low + 1, BUYER_KEY, PROVIDER_KEY)
    second = pairs.Allocation("2", low, low + 1, _key(), _key())

    async def refresh_twice() -> list[str]:
        relay = Relay("127.0.0.1", (low, high), fast_path=False)
        await relay.load([first])
        await relay.load([second])
        opened = list(relay.pairs)
        relay.shutdown()
        return opened

    assert asyncio.run(refresh_twice()) == ["2"]


def test_an_initiation_that_reaches_a_port_before_its_pair_is_kept_for_the_pair(
    unused_udp_ports,
):
    """The relay learns a pair on its next poll; the node's (or the buyer's) first initiation
    can come first. It must place that side when the pair arrives, as if it came then, so the
    other side's first initiation is forwarded at once (before: lost on an unbound port, 5 s to
    wireguard-go's retry)."""
    from meshnet.relay.server import Relay

    low, high = unused_udp_ports
    allocation = pairs.Allocation("1", low, low + 1, BUYER_KEY, PROVIDER_KEY)

    async def early_then_pair() -> tuple[object, bytes, object]:
        relay = Relay("127.0.0.1", (low, high), fast_path=False)
        assert await relay.open_ports() == 2
        loop = asyncio.get_running_loop()
        node = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        buyer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for sock in (node, buyer):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        try:
            # The node's first initiation, to its port, before the relay has the pair.
            node.sendto(initiation(99, BUYER_KEY), ("127.0.0.1", low + 1))
            await asyncio.sleep(0.05)
            await relay.load([allocation])
            placed = relay.pairs["1"].sides[pairs.PROVIDER].address
            # The buyer's first initiation now goes straight to the node.
            sent = initiation(11, PROVIDER_KEY)
            buyer.sendto(sent, ("127.0.0.1", low))
            got = await asyncio.wait_for(loop.sock_recv(node, 2048), 2)
            return placed, got, node.getsockname()
        finally:
            node.close()
            buyer.close()
            relay.shutdown()

    placed, got, node_at = asyncio.run(early_then_pair())
    assert placed == node_at
    assert wgmsg.parse(got) == wgmsg.Message(1, 11, None)


def test_the_next_pairs_first_initiation_on_a_closing_pairs_port_is_kept_for_it(
    unused_udp_ports,
):
    """The gateway gives a stopped order's ports to the next order at once; the relay learns it
    at its next poll. The new buyer's first initiation reached the old pair, which dropped it
    (its mac1 is for another node), and the handshake waited 5 s for the retry."""
    from meshnet.relay.server import Relay

    low, high = unused_udp_ports
    old = pairs.Allocation("1", low, low + 1, BUYER_KEY, PROVIDER_KEY)
    new_buyer, new_provider = _key(), _key()
    new = pairs.Allocation("2", low, low + 1, new_buyer, new_provider)

    async def handover() -> tuple[object, object, int]:
        relay = Relay("127.0.0.1", (low, high), fast_path=False)
        await relay.open_ports()
        await relay.load([old])
        relay.on_datagram(low, initiation(7, new_provider), BUYER_AT)  # the next buyer's
        # One the old pair takes (made for its provider) is its own, not kept for the next.
        relay.on_datagram(low, initiation(8, PROVIDER_KEY), ATTACKER_AT)
        dropped = relay.pairs["1"].counters.dropped
        await relay.load([new])
        placed = relay.pairs["2"].sides[pairs.BUYER].address
        relay.shutdown()
        return placed, relay.pairs, dropped

    placed, _, dropped = asyncio.run(handover())
    assert placed == BUYER_AT
    assert dropped == 2  # the old pair still dropped both (nobody to send them to), as before


def test_only_initiations_are_kept_for_a_pair_not_there_yet(unused_udp_ports):
    from meshnet.relay.server import Relay

    low, high = unused_udp_ports

    async def early() -> dict:
        relay = Relay("127.0.0.1", (low, high), fast_path=False)
        await relay.open_ports()
        relay.on_datagram(low, data(3), ATTACKER_AT)
        relay.on_datagram(low, b"GET / HTTP/1.1\r\n", ATTACKER_AT)
        relay.on_datagram(low + 1, response(6, 5, BUYER_KEY), ATTACKER_AT)
        kept = dict(relay.early)
        relay.on_datagram(low, initiation(5, PROVIDER_KEY), ATTACKER_AT)
        relay.on_datagram(low, initiation(6, PROVIDER_KEY), BUYER_AT)  # the latest wins
        kept_after = {port: source for port, (_, source, _) in relay.early.items()}
        relay.shutdown()
        return {"before": kept, "after": kept_after}

    result = asyncio.run(early())
    assert result == {"before": {}, "after": {low: BUYER_AT}}


@pytest.fixture
def unused_udp_ports() -> tuple[int, int]:
    """Two consecutive UDP ports on 127.0.0.1 that nothing holds now."""
    for low in range(47000, 48000, 2):
        probes = []
        try:
            for port in (low, low + 1):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return low, low + 1
    pytest.fail("no two consecutive free UDP ports in 47000-48000")


# --- what mutation testing found unguarded (make mutate MODULES=relay_pairs) ----------------


def test_an_allocation_is_read_exactly_and_its_ports_checked_at_both_ends():
    entry = {"id": 7, "buyer_port": 1, "provider_port": 65535, "buyer_key": BUYER_KEY,
             "provider_key": PROVIDER_KEY}  # fmt: skip
    assert pairs.Allocation.from_dict(entry) == pairs.Allocation(
        "7", 1, 65535, BUYER_KEY, PROVIDER_KEY
    )
    for port in (0, 65536):
        with pytest.raises(ValueError, match=f"^port out of range: {port}$"):
            pairs.Allocation.from_dict({**entry, "buyer_port": port})
    with pytest.raises(ValueError, match=r"^a pair needs two ports$"):
        pairs.Allocation.from_dict({**entry, "buyer_port": 65535})
    with pytest.raises(ValueError):
        pairs.Allocation.from_dict({**entry, "provider_key": "short"})


def test_a_session_learned_again_is_the_newest_and_the_oldest_is_forgotten_first():
    side = pairs.Side()
    for index in (1, 2):
        side.learn_session(index)
    side.sessions[1] = 5  # a counter seen in session 1
    side.learn_session(1)  # a handshake made it again: newest, nothing seen in it yet
    assert side.sessions == {2: -1, 1: -1} and list(side.sessions) == [2, 1]
    for index in (3, 4):
        side.learn_session(index)
    assert list(side.sessions) == [1, 3, 4]


def test_a_handshake_again_from_the_same_places_changes_nothing_and_moves_count_each_move():
    pair = _pair()
    _handshake(pair)
    pair.receive(pairs.BUYER, BUYER_AT, initiation(21, PROVIDER_KEY), 1.0)
    assert pair.receive(pairs.PROVIDER, PROVIDER_AT, response(22, 21, BUYER_KEY), 1.1) == (
        BUYER_AT,
        False,
    )
    assert pair.counters.moved == 0
    for n, port in enumerate((60001, 60002), start=1):
        pair.receive(pairs.BUYER, ("198.51.100.7", port), data(12, counter=n), 2.0 + n)
    assert pair.counters.moved == 2


def test_the_provider_may_initiate_from_a_new_address_and_the_buyer_answer():
    pair = _pair()
    _handshake(pair)  # the buyer initiated that one
    rebound = ("203.0.113.9", 40404)
    to, changed = pair.receive(pairs.PROVIDER, rebound, initiation(31, BUYER_KEY), 1.0)
    assert (to, changed) == (BUYER_AT, False)  # forwarded; nothing moves before the answer
    to, changed = pair.receive(pairs.BUYER, BUYER_AT, response(32, 31, PROVIDER_KEY), 1.1)
    assert (to, changed) == (rebound, True)
    assert pair.sides[pairs.PROVIDER].address == rebound
    assert pair.sides[pairs.BUYER].address == BUYER_AT
    # The provider's data names the buyer's new index, the buyer's the provider's.
    assert list(pair.sides[pairs.PROVIDER].sessions)[-1] == 32
    assert list(pair.sides[pairs.BUYER].sessions)[-1] == 31


def test_a_response_from_a_side_not_heard_yet_places_it_and_one_from_a_stranger_is_dropped():
    pair = _pair()
    to, changed = pair.receive(pairs.PROVIDER, PROVIDER_AT, response(1, 77, BUYER_KEY), 0.0)
    assert (to, changed) == (None, True)  # nobody to send it to yet
    assert pair.sides[pairs.PROVIDER].address == PROVIDER_AT
    dropped = pair.counters.dropped
    assert pair.receive(pairs.PROVIDER, ATTACKER_AT, response(2, 78, BUYER_KEY), 0.1) == (
        None,
        False,
    )
    assert pair.counters.dropped == dropped + 1
    assert pair.sides[pairs.PROVIDER].address == PROVIDER_AT


def test_an_initiation_is_answered_until_exactly_its_pending_time_at_any_clock_value():
    # time.monotonic() is large on a machine that has been up a while.
    start = 100_000.0
    pair = _pair()
    _handshake(pair)
    moved = ("198.51.100.7", 60004)
    pair.receive(pairs.BUYER, moved, initiation(41, PROVIDER_KEY), start)
    # Another initiation exactly PENDING_SECONDS later does not expire the first.
    pair.receive(pairs.BUYER, ATTACKER_AT, initiation(42, PROVIDER_KEY), start + 1)
    later = start + pairs.PENDING_SECONDS
    pair.receive(pairs.BUYER, ATTACKER_AT, initiation(43, PROVIDER_KEY), later)
    assert 41 in pair.sides[pairs.BUYER].pending
    to, changed = pair.receive(pairs.PROVIDER, PROVIDER_AT, response(44, 41, BUYER_KEY), later)
    assert (to, changed) == (moved, True)


def test_data_from_where_a_side_is_passes_whatever_session_it_names():
    """A session the relay did not see made (one from before the relay started, say) still
    carries data from the side's own address: only a move needs the session."""
    pair = _pair()
    _handshake(pair)
    assert pair.receive(pairs.BUYER, BUYER_AT, data(999), 1.0) == (PROVIDER_AT, False)
    sizes = [64, 96, 1452]
    before = pair.counters.forwarded_bytes
    for size in sizes:
        pair.receive(pairs.BUYER, BUYER_AT, data(12, size), 1.0)
    assert pair.counters.forwarded_bytes == before + sum(sizes)


def test_status_says_where_each_side_is_and_what_was_forwarded():
    pair = _pair()
    assert pair.status() == {
        "id": "p", "buyer_port": 40000, "provider_port": 40001, "buyer": None,
        "provider": None, "handshaken": False,
        "forwarded": {"1": 0, "2": 0, "3": 0, "4": 0}, "forwarded_bytes": 0, "dropped": 0,
        "moved": 0,
    }  # fmt: skip
    _handshake(pair)
    pair.receive(pairs.BUYER, BUYER_AT, data(12, 100), 1.0)
    pair.receive(pairs.BUYER, ("198.51.100.7", 60005), data(12, 32, counter=8), 2.0)
    status = pair.status()
    assert status["buyer"] == "198.51.100.7:60005"
    assert status["provider"] == "203.0.113.9:51820"
    assert status["handshaken"] is True
    assert status["forwarded"] == {"1": 1, "2": 1, "3": 0, "4": 2}
    assert status["forwarded_bytes"] == 148 + 92 + 100 + 32
    assert (status["dropped"], status["moved"]) == (1, 1)


def test_each_side_sends_to_its_own_port_of_the_pair():
    allocation = pairs.Allocation("p", 40000, 40001, BUYER_KEY, PROVIDER_KEY)
    assert (allocation.port(pairs.BUYER), allocation.port(pairs.PROVIDER)) == (40000, 40001)
