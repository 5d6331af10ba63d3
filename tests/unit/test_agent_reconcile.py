"""Peer planning and applying (clawnode.reconcile) against the in-memory FakeBackend."""

from __future__ import annotations

import pytest
from clawnode.backends.base import PeerStatus
from clawnode.backends.memory import FakeBackend
from clawnode.keys import encode_key, generate_wireguard_keypair
from clawnode.reconcile import (
    Add,
    Remove,
    Retire,
    Update,
    apply,
    leaving,
    named_endpoints,
    plan,
    retired,
)
from clawnode.wire import DesiredState, PeerSpec

pytestmark = [pytest.mark.unit]

NODE_ID = "nd_" + "ab" * 16


def key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


A, B, C, D = sorted(key() for _ in range(4))


def spec(public_key: str, *ips: str, endpoint: str = "", keepalive: int = 0) -> PeerSpec:
    return PeerSpec(
        public_key=public_key,
        allowed_ips=ips,
        kind="job",
        ref=f"order-{public_key[:6]}",
        endpoint=endpoint,
        persistent_keepalive=keepalive,
    )


def desired(*peers: PeerSpec, revision: int = 1) -> DesiredState:
    return DesiredState(node_id=NODE_ID, revision=revision, peers=peers, issued_at=1_700_000_000)


def status(public_key: str, *ips: str, endpoint: str = "", keepalive: int = 0, rx: int = 0):
    return PeerStatus(
        public_key=public_key,
        allowed_ips=ips,
        endpoint=endpoint,
        rx_bytes=rx,
        tx_bytes=rx,
        persistent_keepalive=keepalive,
    )


# -- plan ---------------------------------------------------------------------------------------


def test_nothing_to_do_when_actual_matches_desired():
    actual = {A: status(A, "10.100.128.9/32", endpoint="203.0.113.2:40000", rx=500)}

    assert plan(desired(spec(A, "10.100.128.9/32")), actual) == []


def test_new_peers_are_added_and_missing_ones_retired_one_by_one():
    actual = {A: status(A, "10.100.128.9/32"), B: status(B, "10.100.128.10/32")}

    actions = plan(desired(spec(A, "10.100.128.9/32"), spec(C, "10.100.128.11/32")), actual)

    assert actions == [Retire(B), Add(C, ("10.100.128.11/32",))]


def test_a_retired_peer_needs_no_action_and_is_listed_for_removal():
    actual = {
        A: status(A, "10.100.128.9/32"),
        B: status(B),  # retired: no allowed IPs, no keepalive
        C: status(C, keepalive=25),  # not desired, no allowed IPs, but still keeps alive
        D: status(D, "10.100.128.4/32"),
    }
    want = desired(spec(A, "10.100.128.9/32"))

    assert plan(want, actual) == [Retire(C), Retire(D)]
    assert leaving(want, actual) == sorted([B, C, D])
    assert retired(want, actual) == [B]


def test_a_retired_peer_desired_again_is_updated_back():
    actual = {A: status(A)}

    actions = plan(desired(spec(A, "10.100.128.9/32")), actual)

    assert actions == [Update(A, ("10.100.128.9/32",), changed=("allowed_ips",))]


def test_one_new_peer_among_many_never_touches_the_others():
    # Never replace-all: a change of one peer is one action, whatever the interface holds.
    keys = [key() for _ in range(50)]
    peers = [spec(k, f"10.100.129.{i}/32") for i, k in enumerate(keys)]
    actual = {k: status(k, f"10.100.129.{i}/32", rx=1000 + i) for i, k in enumerate(keys)}
    newcomer = key()

    actions = plan(desired(*peers, spec(newcomer, "10.100.130.1/32")), actual)

    assert actions == [Add(newcomer, ("10.100.130.1/32",))]


def test_changed_allowed_ips_keepalive_or_endpoint_is_an_update_not_remove_and_add():
    actual = {
        A: status(A, "10.100.128.9/32"),
        B: status(B, "10.100.128.10/32"),
        C: status(C, "10.100.128.11/32", endpoint="198.51.100.7:51820"),
    }
    want = desired(
        spec(A, "10.100.128.9/32", "10.200.3.0/24"),
        spec(B, "10.100.128.10/32", keepalive=25),
        spec(C, "10.100.128.11/32", endpoint="198.51.100.8:51820"),
    )

    actions = plan(want, actual)

    assert actions == [
        Update(A, ("10.100.128.9/32", "10.200.3.0/24"), changed=("allowed_ips",)),
        Update(B, ("10.100.128.10/32",), keepalive=25, changed=("keepalive",)),
        Update(C, ("10.100.128.11/32",), endpoint="198.51.100.8:51820", changed=("endpoint",)),
    ]
    assert not any(isinstance(a, (Add, Remove)) for a in actions)


def test_allowed_ips_are_compared_as_sets_of_networks():
    actual = {A: status(A, "10.200.3.0/24", "10.100.128.9/32")}

    assert plan(desired(spec(A, "10.100.128.9/32", "10.200.3.0/24")), actual) == []


def test_a_roaming_peer_with_no_desired_endpoint_keeps_the_endpoint_wireguard_learnt():
    actual = {A: status(A, "10.100.128.9/32", endpoint="203.0.113.2:43122")}

    assert plan(desired(spec(A, "10.100.128.9/32", endpoint="")), actual) == []


def test_endpoints_are_compared_by_address_value():
    actual = {A: status(A, "10.100.128.9/32", endpoint="[2001:db8::1]:51820")}

    assert plan(desired(spec(A, "10.100.128.9/32", endpoint="[2001:db8:0::1]:51820")), actual) == []


def test_the_plan_is_deterministic_whatever_the_input_order():
    actual_one = {D: status(D, "10.100.128.4/32"), C: status(C, "10.100.128.3/32")}
    actual_two = dict(reversed(list(actual_one.items())))
    peers = [spec(B, "10.100.128.2/32"), spec(A, "10.100.128.1/32")]

    one = plan(desired(*peers), actual_one)
    two = plan(desired(*reversed(peers)), actual_two)

    assert (
        one
        == two
        == [Retire(C), Retire(D), Add(A, ("10.100.128.1/32",)), Add(B, ("10.100.128.2/32",))]
    )


def test_retirements_come_before_additions_so_a_moved_network_is_free_first():
    actual = {A: status(A, "10.100.128.9/32")}

    actions = plan(desired(spec(B, "10.100.128.9/32")), actual)

    assert actions == [Retire(A), Add(B, ("10.100.128.9/32",))]


def test_an_empty_desired_state_retires_every_peer():
    actual = {A: status(A, "10.100.128.9/32"), B: status(B, "10.100.128.10/32")}

    assert plan(desired(), actual) == [Retire(A), Retire(B)]


# -- apply --------------------------------------------------------------------------------------


def fake_with(*peers: PeerStatus) -> FakeBackend:
    backend = FakeBackend()
    backend.ensure_interface("molt0", b"\x01" * 32, 51820, "10.100.128.1/17")
    for peer in peers:
        backend.set_peer(peer.public_key, peer.allowed_ips)
    return backend


def test_apply_then_plan_again_finds_nothing_to_do():
    backend = fake_with(status(A, "10.100.128.9/32"), status(B, "10.100.128.10/32"))
    want = desired(spec(A, "10.100.128.9/32", keepalive=25), spec(C, "10.100.128.11/32"))

    results = apply(backend, plan(want, backend.list_peers()))

    assert results == {A: "ok", B: "ok", C: "ok"}
    # B is cut off (no allowed IPs, counters kept) and left for its final read.
    peers = backend.list_peers()
    assert sorted(peers) == sorted([A, B, C]) and peers[B].allowed_ips == ()
    assert plan(want, peers) == []
    assert retired(want, peers) == [B]

    assert apply(backend, [Remove(B)]) == {B: "ok"}
    assert sorted(backend.list_peers()) == sorted([A, C])
    assert plan(want, backend.list_peers()) == []


def test_an_update_keeps_the_peers_counters():
    backend = fake_with(status(A, "10.100.128.9/32"))
    backend.add_traffic(A, rx=12_345, tx=6_789, handshake_at=1_700_000_100)

    results = apply(
        backend, plan(desired(spec(A, "10.100.128.9/32", keepalive=25)), backend.list_peers())
    )

    peer = backend.list_peers()[A]
    assert results == {A: "ok"}
    assert (peer.rx_bytes, peer.tx_bytes, peer.last_handshake) == (12_345, 6_789, 1_700_000_100)
    assert peer.persistent_keepalive == 25
    assert [op for op, _ in backend.calls].count("remove_peer") == 0


def test_one_refused_peer_does_not_stop_the_others():
    backend = fake_with(status(D, "10.100.128.4/32"))
    backend.refuse[B] = "device out of memory"
    want = desired(
        spec(A, "10.100.128.1/32"), spec(B, "10.100.128.2/32"), spec(C, "10.100.128.3/32")
    )

    results = apply(backend, plan(want, backend.list_peers()))

    assert results == {D: "ok", A: "ok", B: "error: device out of memory", C: "ok"}
    assert sorted(backend.list_peers()) == sorted([A, C, D])
    assert backend.list_peers()[D].allowed_ips == ()
    # The next reconcile retries only what failed.
    del backend.refuse[B]
    assert plan(want, backend.list_peers()) == [Add(B, ("10.100.128.2/32",))]


def test_apply_records_errors_of_any_kind_as_text():
    backend = FakeBackend()  # no interface: every change fails

    results = apply(backend, [Add(A, ("10.100.128.1/32",)), Remove(B)])

    assert results[A].startswith("error: ") and "does not exist" in results[A]
    assert results[B].startswith("error: ")


# -- coordinated punching: a desired endpoint vs a live session (docs/nat.md) --------------------

NOW = 1_700_000_000
BUYER_OLD = "198.51.100.7:40000"
BUYER_NEW = "198.51.100.7:41000"


def punching_backend(handshake_at: int) -> FakeBackend:
    """A job peer with the endpoint WireGuard learnt, and its latest handshake at `handshake_at`."""
    backend = fake_with(status(A, "10.100.128.9/32"))
    backend.set_peer(A, ("10.100.128.9/32",), endpoint=BUYER_OLD)
    backend.add_traffic(A, 100, 100, handshake_at=handshake_at)
    return backend


def test_the_buyers_mapping_is_applied_to_a_peer_with_no_recent_handshake():
    backend = punching_backend(handshake_at=NOW - 181)
    want = desired(spec(A, "10.100.128.9/32", endpoint=BUYER_NEW, keepalive=25))

    actions = plan(want, backend.list_peers(), now=NOW)

    assert actions == [
        Update(
            A,
            ("10.100.128.9/32",),
            endpoint=BUYER_NEW,
            keepalive=25,
            changed=("endpoint", "keepalive"),
        )
    ]
    assert apply(backend, actions) == {A: "ok"}
    peer = backend.list_peers()[A]
    assert (peer.endpoint, peer.persistent_keepalive) == (BUYER_NEW, 25)
    assert plan(want, backend.list_peers(), now=NOW) == []


def test_an_endpoint_with_a_handshake_in_the_last_180_s_is_never_overwritten():
    backend = punching_backend(handshake_at=NOW - 179)
    want = desired(spec(A, "10.100.128.9/32", endpoint=BUYER_NEW, keepalive=25))

    actions = plan(want, backend.list_peers(), now=NOW)

    # The keepalive still applies; the endpoint WireGuard roamed to stays.
    assert actions == [Update(A, ("10.100.128.9/32",), keepalive=25, changed=("keepalive",))]
    assert apply(backend, actions) == {A: "ok"}
    peer = backend.list_peers()[A]
    assert (peer.endpoint, peer.persistent_keepalive) == (BUYER_OLD, 25)
    # Nothing else to do while the session is live, and the endpoint moves once it is not.
    assert plan(want, backend.list_peers(), now=NOW) == []
    (later,) = plan(want, backend.list_peers(), now=NOW - 179 + 180)
    assert later.endpoint == BUYER_NEW and later.changed == ("endpoint",)


def test_without_a_clock_every_endpoint_change_is_planned():
    backend = punching_backend(handshake_at=NOW - 1)
    want = desired(spec(A, "10.100.128.9/32", endpoint=BUYER_NEW))

    (update,) = plan(want, backend.list_peers())

    assert update.endpoint == BUYER_NEW and update.changed == ("endpoint",)


def test_a_new_peer_gets_the_buyers_mapping_at_once():
    backend = fake_with()
    want = desired(spec(A, "10.100.128.9/32", endpoint=BUYER_NEW, keepalive=25))

    assert plan(want, backend.list_peers(), now=NOW) == [
        Add(A, ("10.100.128.9/32",), endpoint=BUYER_NEW, keepalive=25)
    ]


# -- a relayed path upgrading to direct: the gateway's own previous choice moves (docs/nat.md) ---

RELAY = "192.0.2.40:52001"  # the relay's provider port for this pair
BUYER = "198.51.100.7:40000"  # the buyer's mapping, as the hub saw it
ELSEWHERE = "203.0.113.9:45000"  # where WireGuard roamed a peer on its own


def live_peers(endpoints: dict[str, str]) -> FakeBackend:
    """Job peers at these endpoints, each with a handshake 1 s ago (a live tunnel)."""
    backend = fake_with(*(status(k, f"10.100.128.{i + 1}/32") for i, k in enumerate(endpoints)))
    for i, (k, endpoint) in enumerate(endpoints.items()):
        backend.set_peer(k, (f"10.100.128.{i + 1}/32",), endpoint=endpoint, keepalive=25)
        backend.add_traffic(k, 100, 100, handshake_at=NOW - 1)
    return backend


def naming(endpoints: dict[str, str]) -> DesiredState:
    return desired(
        *(
            spec(k, f"10.100.128.{i + 1}/32", endpoint=endpoint, keepalive=25)
            for i, (k, endpoint) in enumerate(endpoints.items())
        )
    )


def moves(actions: list[object]) -> dict[str, str]:
    return {a.public_key: a.endpoint for a in actions if "endpoint" in a.changed}


def test_an_upgrade_moves_a_live_peer_off_the_relay_the_gateway_named_but_not_a_roamed_one():
    # A sends to the relay the last state named; B's endpoint is not the one named for it:
    # WireGuard roamed it there from the buyer's packets, and that session is kept.
    backend = live_peers({A: RELAY, B: ELSEWHERE})
    before = naming({A: RELAY, B: RELAY})
    upgrade = naming({A: BUYER, B: BUYER})

    actions = plan(upgrade, backend.list_peers(), now=NOW, previous=named_endpoints(before))

    assert actions == [Update(A, ("10.100.128.1/32",), BUYER, 25, ("endpoint",))]
    assert apply(backend, actions) == {A: "ok"}
    assert {k: p.endpoint for k, p in backend.list_peers().items()} == {A: BUYER, B: ELSEWHERE}


def test_an_endpoint_is_compared_with_the_one_named_by_value():
    backend = live_peers({A: "[2001:db8::40]:52001"})

    actions = plan(
        naming({A: BUYER}), backend.list_peers(), now=NOW, previous={A: "[2001:db8:0::40]:52001"}
    )

    assert moves(actions) == {A: BUYER}


def test_a_given_up_upgrade_moves_back_to_the_relay_unless_wireguard_roamed_there_already():
    # A still sends to the buyer's mapping the upgrade named (the buyer's client did not roam,
    # and nothing came from the relay's side yet); B was roamed back by the buyer's packets
    # through the relay: nothing to do for it.
    backend = live_peers({A: BUYER, B: RELAY})
    upgrade = naming({A: BUYER, B: BUYER})
    given_up = naming({A: RELAY, B: RELAY})

    actions = plan(given_up, backend.list_peers(), now=NOW, previous=named_endpoints(upgrade))

    assert actions == [Update(A, ("10.100.128.1/32",), RELAY, 25, ("endpoint",))]
    assert apply(backend, actions) == {A: "ok"}
    assert plan(given_up, backend.list_peers(), now=NOW, previous=named_endpoints(given_up)) == []


@pytest.mark.parametrize("previous", [None, {}], ids=["none", "empty"])
def test_with_no_previous_state_a_live_endpoint_is_never_overwritten(previous):
    # A restarted agent cannot tell the relay it was told from an endpoint WireGuard roamed to:
    # the old rule holds (the upgrade is given up, safely). The same peer with the state it
    # applied before does move.
    backend = live_peers({A: RELAY})
    upgrade = naming({A: BUYER})

    assert moves(plan(upgrade, backend.list_peers(), now=NOW, previous=previous)) == {}
    assert moves(plan(upgrade, backend.list_peers(), now=NOW, previous={A: RELAY})) == {A: BUYER}


def test_named_endpoints_are_those_the_state_names():
    state = desired(spec(A, "10.100.128.1/32", endpoint=RELAY), spec(B, "10.100.128.2/32"))

    assert named_endpoints(state) == {A: RELAY}
