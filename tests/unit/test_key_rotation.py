"""Gateway key rotation as the agent sees it: the certificate chain rules
(clawnode.wire.keycert.follow_key_chain), opening a desired state through them
(clawnode.repin) and the daemon pinning the new key on disk."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import time

import pytest
from clawnode import wire
from clawnode.keys import Identity
from clawnode.repin import open_desired_state
from clawnode.state import Enrollment, StateDir

from tests.unit.test_agent_daemon_view import GATEWAY, Node, wg_key

pytestmark = [pytest.mark.unit]

NOW = 1_800_000_000
K1 = Identity.from_seed(bytes(range(1, 33)))
K2 = Identity.from_seed(bytes(range(2, 34)))
MALLORY = Identity.from_seed(bytes(range(3, 35)))


def cert(old: Identity, new: Identity, sequence: int, *, signer=None, not_before=NOW):
    body = wire.KeyCert(old.public_key_b64, new.public_key_b64, sequence, not_before).to_dict()
    return wire.signed_envelope(wire.KEY_CERT, body, signer or old)


CHAIN = [cert(GATEWAY, K1, 1), cert(K1, K2, 2)]


def test_a_chain_from_the_pinned_key_leads_to_its_last_key():
    assert wire.follow_key_chain(GATEWAY.public_key, 0, CHAIN, NOW) == (K2.public_key, 2)
    assert wire.follow_key_chain(GATEWAY.public_key, 0, CHAIN[:1], NOW) == (K1.public_key, 1)


def test_an_agent_that_joined_after_a_rotation_skips_the_history_before_its_key():
    # Pinned K1 at join (sequence 0): certificate 1, which leads to K1, is not read.
    assert wire.follow_key_chain(K1.public_key, 0, CHAIN, NOW) == (K2.public_key, 2)


def test_a_certificate_not_signed_by_the_pinned_key_is_refused():
    forged = [cert(GATEWAY, MALLORY, 1, signer=MALLORY)]
    with pytest.raises(wire.BadSignature, match="key certificate 0"):
        wire.follow_key_chain(GATEWAY.public_key, 0, forged, NOW)


def test_a_chain_that_does_not_start_at_the_pinned_key_is_refused():
    with pytest.raises(wire.ProtocolError, match="no key certificate is signed by the pinned"):
        wire.follow_key_chain(MALLORY.public_key, 0, CHAIN, NOW)


def test_a_link_signed_by_a_key_other_than_the_one_before_it_is_refused():
    broken = [cert(GATEWAY, K1, 1), cert(K1, K2, 2, signer=MALLORY)]
    with pytest.raises(wire.BadSignature, match="key certificate 1"):
        wire.follow_key_chain(GATEWAY.public_key, 0, broken, NOW)


def test_a_link_that_names_another_old_key_is_refused():
    # Properly signed by K2 itself, but the chain was at K1.
    broken = [cert(GATEWAY, K1, 1), cert(K2, MALLORY, 2)]
    with pytest.raises(wire.BadSignature):
        wire.follow_key_chain(GATEWAY.public_key, 0, broken, NOW)


def test_a_replayed_or_forked_certificate_at_or_below_the_pinned_sequence_is_refused():
    # The agent is at K1 by certificate 1; a fork signed by K1 with a sequence the agent already
    # passed, at the place the next certificate belongs: never followed.
    fork = [cert(GATEWAY, K1, 1), cert(K1, MALLORY, 1)]
    with pytest.raises(wire.ProtocolError, match="replayed or forked"):
        wire.follow_key_chain(K1.public_key, 1, fork, NOW)


K3 = Identity.from_seed(bytes(range(4, 36)))
LONG = [*CHAIN, cert(K2, K3, 3)]


def test_a_key_pinned_at_a_known_sequence_is_followed_from_its_place_in_the_chain():
    # Told sequence 1 at enrolment (or reached by an earlier chain): certificate 2, at index 1.
    assert wire.follow_key_chain(K1.public_key, 1, LONG, NOW) == (K3.public_key, 3)
    assert wire.follow_key_chain(K2.public_key, 2, LONG, NOW) == (K3.public_key, 3)


def test_the_chain_is_not_searched_for_a_key_pinned_at_a_known_sequence():
    # K2 claimed to sit at sequence 1: the certificate there retires K1, not K2. Searching
    # would have found K2's own certificate further on and followed it.
    with pytest.raises(wire.ProtocolError, match="certificate 1 does not retire the pinned key"):
        wire.follow_key_chain(K2.public_key, 1, LONG, NOW)
    with pytest.raises(wire.ProtocolError, match="end at sequence 2, not past the pinned"):
        wire.follow_key_chain(K2.public_key, 2, CHAIN, NOW)


def test_from_a_known_sequence_the_first_certificate_followed_has_no_gap_either():
    # Pinned K1 at sequence 1: the next certificate must be 2. Only a pin at sequence 0 (its
    # place unknown: joined before the gateway told it) may skip ahead.
    skipping = [cert(GATEWAY, K1, 1), cert(K1, K2, 3)]
    with pytest.raises(wire.ProtocolError, match="sequence 3 after 1"):
        wire.follow_key_chain(K1.public_key, 1, skipping, NOW)


def test_a_gap_in_the_sequence_is_refused():
    gap = [cert(GATEWAY, K1, 1), cert(K1, K2, 3)]
    with pytest.raises(wire.ProtocolError, match="sequence 3 after 1"):
        wire.follow_key_chain(GATEWAY.public_key, 0, gap, NOW)


def test_a_chain_that_brings_back_a_retired_key_is_refused():
    cycle = [cert(GATEWAY, K1, 1), cert(K1, GATEWAY, 2)]
    with pytest.raises(wire.ProtocolError, match="retired key"):
        wire.follow_key_chain(GATEWAY.public_key, 0, cycle, NOW)


def test_a_certificate_not_yet_valid_is_refused_within_the_clock_skew_allowed():
    early = [cert(GATEWAY, K1, 1, not_before=NOW + 301)]
    with pytest.raises(wire.ProtocolError, match="not valid before"):
        wire.follow_key_chain(GATEWAY.public_key, 0, early, NOW)
    skewed = [cert(GATEWAY, K1, 1, not_before=NOW + 300)]
    assert wire.follow_key_chain(GATEWAY.public_key, 0, skewed, NOW)[1] == 1


@pytest.mark.parametrize("chain", ["text", {"a": 1}, [cert(GATEWAY, K1, 1)] * 65])
def test_a_chain_that_is_not_a_short_list_is_refused(chain):
    with pytest.raises(wire.ProtocolError):
        wire.follow_key_chain(GATEWAY.public_key, 0, chain, NOW)


def test_a_certificate_naming_one_key_twice_cannot_be_made():
    with pytest.raises(wire.ProtocolError):
        wire.KeyCert(K1.public_key_b64, K1.public_key_b64, 1, NOW)


# -- the daemon ---------------------------------------------------------------------------------


def state_by(node: Node, signer: Identity, peers: dict[str, str]) -> dict:
    node.revision += 1
    desired = wire.DesiredState(
        node_id=node.identity.node_id,
        revision=node.revision,
        peers=tuple(
            wire.PeerSpec(k, (n,), "job", f"o-{i}") for i, (k, n) in enumerate(peers.items())
        ),
        issued_at=int(time.time()),
    )
    return wire.signed_envelope(wire.DESIRED_STATE, desired.to_dict(), signer)


def feed(node: Node, envelope: dict, key_certs) -> None:
    asyncio.run(node.agent._apply_desired(node.ws, envelope, key_certs))


def test_the_agent_applies_a_state_signed_by_the_rotated_key_and_pins_it_on_disk(tmp_path):
    node = Node(tmp_path)
    key = wg_key()
    now_chain = [cert(GATEWAY, K1, 1, not_before=int(time.time()))]

    feed(node, state_by(node, K1, {key: "10.64.0.9/32"}), now_chain)

    assert set(node.backend.peers) == {key}
    assert node.ws.of("ack")
    saved = StateDir(tmp_path).load_enrollment()
    assert saved is not None
    assert (saved.gateway_public_key, saved.gateway_key_sequence) == (K1.public_key_b64, 1)
    assert stat.S_IMODE(os.stat(StateDir(tmp_path).enrollment_path).st_mode) == 0o600
    # From now on the old key is not trusted any more, the new one directly.
    feed(node, state_by(node, GATEWAY, {}), None)
    assert set(node.backend.peers) == {key}
    assert node.ws.sent[-1]["type"] == "report"
    feed(node, state_by(node, K1, {}), None)
    node.finish_removals()
    assert node.backend.peers == {}


def test_a_state_signed_by_a_key_a_forged_chain_leads_to_is_refused_and_nothing_is_pinned(
    tmp_path,
):
    node = Node(tmp_path)
    forged = [cert(GATEWAY, MALLORY, 1, signer=MALLORY)]

    feed(node, state_by(node, MALLORY, {wg_key(): "10.64.0.9/32"}), forged)

    assert node.backend.peers == {}
    assert not node.ws.of("ack")
    report = node.ws.sent[-1]
    assert report["type"] == "report"
    assert "key certificate 0" in report["detail"]
    assert node.agent.enrollment.gateway_public_key == GATEWAY.public_key_b64
    assert not StateDir(tmp_path).enrollment_path.exists()


def test_a_node_pinned_at_its_enrolment_sequence_ratchets_and_a_retired_key_cannot_sign_again(
    tmp_path,
):
    # Enrolled after one rotation: the answer said K1, sequence 1 (clawnode join saves both).
    node = Node(tmp_path)
    node.agent.enrollment = dataclasses.replace(
        node.agent.enrollment, gateway_public_key=K1.public_key_b64, gateway_key_sequence=1
    )
    key = wg_key()
    chain = [cert(GATEWAY, K1, 1), cert(K1, K2, 2, not_before=int(time.time()))]

    feed(node, state_by(node, K2, {key: "10.64.0.9/32"}), chain)

    assert set(node.backend.peers) == {key}
    saved = StateDir(tmp_path).load_enrollment()
    assert saved is not None
    assert (saved.gateway_public_key, saved.gateway_key_sequence) == (K2.public_key_b64, 2)
    assert stat.S_IMODE(os.stat(StateDir(tmp_path).enrollment_path).st_mode) == 0o600
    # K1 is retired, and say it leaked: neither a state it signs nor a fork of the chain it
    # signs (a certificate 2 of its own, to a key of the thief's) moves the node.
    fork = [cert(GATEWAY, K1, 1), cert(K1, MALLORY, 2, not_before=int(time.time()))]
    for envelope, certs in (
        (state_by(node, K1, {}), chain),
        (state_by(node, MALLORY, {}), fork),
        (state_by(node, MALLORY, {}), [*fork, cert(MALLORY, K3, 3)]),
    ):
        feed(node, envelope, certs)
        assert node.ws.sent[-1]["type"] == "report"
        assert set(node.backend.peers) == {key}
    assert StateDir(tmp_path).load_enrollment() == saved
    assert node.agent.enrollment == saved


def test_a_valid_chain_does_not_make_a_state_signed_by_another_key_acceptable():
    enrollment = _enrollment()
    envelope = wire.signed_envelope(wire.DESIRED_STATE, {"x": 1}, MALLORY)
    with pytest.raises(wire.BadSignature, match="nor for the key the certificates lead to"):
        open_desired_state(envelope, enrollment, CHAIN, NOW)


def test_a_state_signed_by_the_pinned_key_ignores_the_chain():
    enrollment = _enrollment()
    envelope = wire.signed_envelope(wire.DESIRED_STATE, {"x": 1}, GATEWAY)
    assert open_desired_state(envelope, enrollment, "garbage", NOW) == ({"x": 1}, None)


def _enrollment() -> Enrollment:
    return Enrollment(
        gateway="http://127.0.0.1:9",
        node_id="nd_" + "ab" * 16,
        name="node-1",
        mesh_address="10.100.128.1",
        gateway_public_key=GATEWAY.public_key_b64,
        websocket_url="ws://127.0.0.1:9/ws/agent/",
    )
