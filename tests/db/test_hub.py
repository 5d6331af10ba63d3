"""The gateway's WireGuard hub (meshnet.hub): the hub peer in every node's signed desired state,
the hub's own peer set following the database (a revoked node leaves it), the mappings it
observes stored per node, and the buyer's endpoint taken from them. The hub process on real
wireguard-go behind the NAT lab is tests/nat/test_hub_discovery.py."""

from __future__ import annotations

import dataclasses
import io
import logging

import pytest
from clawnode import frames, reconcile, wire
from clawnode.backends.base import PeerStatus, same_private_key
from clawnode.backends.memory import FakeBackend
from clawnode.keys import encode_key
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError

from marketplace.demo_data import enrol_node
from meshnet import hub
from meshnet.agent_channel import process_ack
from meshnet.desired_state import desired_state, signed_desired_state
from meshnet.errors import InvalidPeerKey
from meshnet.gateway_key import gateway_identity, rotate_gateway_key
from meshnet.management.commands import run_hub
from meshnet.models import Node
from meshnet.nodes import revoke_node
from meshnet.peers import validate_peer_key
from meshnet.wgconfig import buyer_config
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

HUB_AT = "192.0.2.10:51800"


@pytest.fixture
def hub_on(settings):
    settings.MOLT_HUB_ENDPOINT = HUB_AT
    settings.MOLT_HUB_KEEPALIVE_SECONDS = 5
    return settings


def test_no_hub_configured_no_hub_peer(settings, provider):
    settings.MOLT_HUB_ENDPOINT = ""
    node = factories.enrolled_node(provider)
    assert hub.hub_peer() is None
    assert desired_state(node).peers == ()


def test_the_signed_desired_state_carries_the_hub_peer(hub_on, provider):
    node = factories.enrolled_node(provider)
    envelope = signed_desired_state(node)
    # What the agent does with it: check the gateway's signature it pinned, parse it.
    body = wire.open_envelope(envelope, gateway_identity().public_key, wire.DESIRED_STATE)
    state = wire.DesiredState.from_dict(body)
    (peer,) = state.peers
    assert peer.public_key == gateway_identity().wireguard_public_key_b64
    assert peer.allowed_ips == ("10.100.0.1/32",)
    assert (peer.kind, peer.ref) == ("mesh", "hub")
    assert peer.endpoint == HUB_AT
    assert peer.persistent_keepalive == 5
    # The agent's reconcile adds it with its endpoint and keepalive, as for any peer.
    (add,) = reconcile.plan(state, {})
    assert add == reconcile.Add(peer.public_key, ("10.100.0.1/32",), HUB_AT, 5)


def test_a_bad_hub_endpoint_stops_the_gateway(settings):
    settings.MOLT_HUB_ENDPOINT = "no port here"
    with pytest.raises(ImproperlyConfigured, match="MOLT_HUB_ENDPOINT"):
        hub.check_hub_settings()
    settings.MOLT_HUB_ENDPOINT = ""
    hub.check_hub_settings()  # off is fine


def test_a_buyer_cannot_order_with_the_hubs_key(hub_on, provider):
    factories.enrolled_node(provider)
    with pytest.raises(InvalidPeerKey, match="gateway's own key"):
        validate_peer_key(hub.hub_public_key())
    assert validate_peer_key(factories.wg_public_key())


def test_hub_peers_are_the_non_revoked_nodes_and_a_revoked_one_leaves(hub_on, provider):
    kept = factories.enrolled_node(provider)
    revoked = factories.enrolled_node(provider)
    device = FakeBackend()
    device.ensure_interface("molthub", hub.hub_private_key(), 51800, hub.HUB_ADDRESS)
    results = hub.reconcile_peers(device)
    assert set(results.values()) == {"ok"}
    assert device.list_peers().keys() == {kept.wireguard_public_key, revoked.wireguard_public_key}
    # No allowed IP: nothing a node sends into the tunnel reaches the gateway host.
    assert device.peers[kept.wireguard_public_key].allowed_ips == ()
    assert device.peers[kept.wireguard_public_key].persistent_keepalive == 0

    assert revoke_node(revoked)
    assert hub.reconcile_peers(device) == {revoked.wireguard_public_key: "ok"}
    assert device.list_peers().keys() == {kept.wireguard_public_key}
    # Nothing left to do: a second pass changes nothing.
    assert hub.reconcile_peers(device) == {}


def test_the_running_hub_takes_a_rotated_gateway_key_in_place_keeping_its_peers(
    hub_on, provider, tmp_path, caplog
):
    hub_on.MOLT_STATE_DIR = tmp_path / "gateway-state"  # rotating the session's key would leak
    node = factories.enrolled_node(provider)
    device = FakeBackend()
    applied = hub.bring_up(device)
    assert applied == gateway_identity().wireguard_public_key_b64
    hub.reconcile_peers(device)
    # WireGuard learnt the node's mapping from its handshakes: a restart-free rotation keeps it.
    key = node.wireguard_public_key
    device.peers[key] = dataclasses.replace(
        device.peers[key], endpoint="203.0.113.7:40001", last_handshake=1_700_000_000
    )
    peers = dict(device.peers)
    assert hub.follow_gateway_key(device, applied) == applied
    assert ("ensure_interface", "molthub") not in device.calls[1:]  # not rotated: untouched

    rotate_gateway_key()
    new = gateway_identity()
    with caplog.at_level(logging.INFO, logger="meshnet.hub"):
        now = hub.follow_gateway_key(device, applied)

    assert now == new.wireguard_public_key_b64 != applied
    assert same_private_key(device.private_key, new.wireguard_private_key)
    assert (device.listen_port, device.address) == (hub_on.MOLT_HUB_PORT, hub.HUB_ADDRESS)
    assert device.peers == peers
    assert hub.observed_endpoints(device.list_peers()) == {key: "203.0.113.7:40001"}
    (line,) = [r.getMessage() for r in caplog.records if r.name == "meshnet.hub"]
    assert now in line and applied in line
    private = new.wireguard_private_key
    assert encode_key(private) not in line and private.hex() not in line
    # The nodes' desired states name the hub by its new key.
    assert hub.hub_peer().public_key == now
    calls = len(device.calls)
    assert hub.follow_gateway_key(device, now) == now
    assert len(device.calls) == calls


class StopHub(Exception):
    pass


def test_run_hub_follows_a_rotation_on_its_next_reconcile_without_a_restart(
    hub_on, provider, tmp_path, monkeypatch, caplog
):
    hub_on.MOLT_STATE_DIR = tmp_path / "gateway-state"
    hub_on.MOLT_HUB_POLL_SECONDS = 0
    hub_on.MOLT_HUB_RECONCILE_SECONDS = 0  # every round reconciles
    node = factories.enrolled_node(provider)
    device = FakeBackend()
    monkeypatch.setattr(run_hub, "choose_backend", lambda _: (lambda _name: device, "fake"))
    monkeypatch.setattr(run_hub.signal, "signal", lambda *_: None)  # keep pytest's handlers
    rounds = []

    def discover(backend):
        rounds.append(encode_key(backend.private_key))
        if len(rounds) == 1:
            rotate_gateway_key()  # an operator rotates while the hub runs
        else:
            raise StopHub

    monkeypatch.setattr(hub, "discover", discover)
    first = gateway_identity()
    with caplog.at_level(logging.INFO, logger="meshnet.hub"), pytest.raises(StopHub):
        call_command("run_hub", stdout=io.StringIO())

    new = gateway_identity()
    assert new.public_key != first.public_key
    assert rounds == [
        encode_key(first.wireguard_private_key),
        encode_key(new.wireguard_private_key),
    ]
    assert device.list_peers().keys() == {node.wireguard_public_key}  # the same interface, kept
    assert [r.getMessage() for r in caplog.records if r.name == "meshnet.hub"] == [
        f"hub key follows the rotated gateway key: {new.wireguard_public_key_b64} "
        f"(was {first.wireguard_public_key_b64}), peers kept"
    ]


def test_plan_peers_fixes_drift_and_never_sets_keepalive_or_endpoint():
    a, b, c = (factories.wg_public_key() for _ in range(3))
    actual = {
        a: PeerStatus(a, (), endpoint="203.0.113.5:4000"),  # as wanted, endpoint learnt
        # drifted: an allowed IP and a keepalive someone set by hand
        b: PeerStatus(b, ("10.100.128.9/32",), persistent_keepalive=25),
        c: PeerStatus(c, ()),  # no longer a node
    }
    wanted = {a: (), b: ()}
    assert hub.plan_peers(wanted, actual) == [
        reconcile.Remove(c),
        reconcile.Update(b, (), changed=("allowed_ips",)),
    ]
    assert hub.plan_peers(wanted, {**actual, b: PeerStatus(b, ())}) == [reconcile.Remove(c)]


def test_observed_endpoints_only_after_a_handshake():
    a, b = factories.wg_public_key(), factories.wg_public_key()
    actual = {
        a: PeerStatus(a, (), endpoint="203.0.113.7:40001", last_handshake=1_700_000_000),
        b: PeerStatus(b, (), endpoint="", last_handshake=0),
    }
    assert hub.observed_endpoints(actual) == {a: "203.0.113.7:40001"}


def test_discovery_stores_the_mapping_and_the_buyer_config_uses_it(hub_on, provider):
    node = factories.enrolled_node(provider)  # connected from 203.0.113.10, no --endpoint
    assert node.endpoint == "203.0.113.10:51820"
    device = FakeBackend()
    device.ensure_interface("molthub", hub.hub_private_key(), 51800, hub.HUB_ADDRESS)
    hub.reconcile_peers(device)
    assert hub.discover(device) == []  # no handshake yet: nothing observed

    # The node's keepalives reach the hub from its NAT's mapping.
    device.set_peer(node.wireguard_public_key, (), "198.18.0.1:61234")
    device.add_traffic(node.wireguard_public_key, 148, 92)
    assert hub.discover(device) == [node.node_id]
    node.refresh_from_db()
    assert node.observed_endpoint == "198.18.0.1:61234"
    assert node.observed_endpoint_at is not None
    assert node.endpoint == "198.18.0.1:61234"
    config = buyer_config(
        job_address="10.100.128.50",
        provider_public_key=node.wireguard_public_key,
        provider_address=node.mesh_address,
        endpoint=node.endpoint,
        order_label="order 1",
    )
    assert "Endpoint = 198.18.0.1:61234" in config

    # Unchanged: no write. The router reboots, a new mapping: stored.
    first_seen = node.observed_endpoint_at
    assert hub.discover(device) == []
    device.set_peer(node.wireguard_public_key, (), "198.18.0.1:50000")
    assert hub.discover(device) == [node.node_id]
    node.refresh_from_db()
    assert node.observed_endpoint == "198.18.0.1:50000"
    assert node.observed_endpoint_at >= first_seen


def test_a_declared_endpoint_wins_over_the_observed_mapping(hub_on, provider):
    node = factories.enrolled_node(provider)
    Node.objects.filter(pk=node.pk).update(
        declared_endpoint="gpu.example.net:51820", observed_endpoint="198.18.0.1:61234"
    )
    node.refresh_from_db()
    assert node.endpoint == "gpu.example.net:51820"


def test_a_revoked_nodes_mapping_is_not_recorded(hub_on, provider):
    node = factories.enrolled_node(provider)
    revoke_node(node)
    assert hub.record_endpoints({node.wireguard_public_key: "198.18.0.1:1"}) == []
    node.refresh_from_db()
    assert node.observed_endpoint == ""


def test_run_hub_refuses_to_start_without_a_hub_endpoint(settings):
    settings.MOLT_HUB_ENDPOINT = ""
    with pytest.raises(CommandError, match="MOLT_HUB_ENDPOINT is not set"):
        call_command("run_hub")


def test_a_node_that_cannot_add_the_hub_still_acknowledges_its_revision(hub_on, provider):
    node, identity = enrol_node(provider, hostname="rig", gpus=[], observed_ip="203.0.113.9")
    Node.objects.filter(pk=node.pk).update(desired_revision=3)
    node.refresh_from_db()
    hub_key = hub.hub_public_key()
    results = {hub_key: "error: cannot resolve endpoint host 'hub.example'"}
    process_ack(node, frames.ack(identity, 3, results, [])["envelope"])
    node.refresh_from_db()
    assert node.acked_revision == 3  # not lagging: no re-push for the hub's sake
    assert "could not add the gateway hub peer" in node.last_report
    assert "hub.example" in node.last_report


# -- buyers' mappings and coordinated punching (docs/nat.md) -------------------------------------


@pytest.fixture
def pushes(monkeypatch):
    """The node pks whose desired state was pushed (meshnet.tasks.push_desired_state)."""
    from meshnet import tasks

    sent: list[int] = []
    monkeypatch.setattr(tasks.push_desired_state, "delay", sent.append)
    return sent


def job_peer_on(node, ref="order:1"):
    from meshnet.peers import create_job_peer

    return create_job_peer(node, factories.wg_public_key(), ref=ref)


def test_the_buyers_config_carries_the_hub_as_a_second_peer(hub_on, provider):
    node = factories.enrolled_node(provider)
    config = buyer_config(
        job_address="10.100.128.50",
        provider_public_key=node.wireguard_public_key,
        provider_address=node.mesh_address,
        endpoint=node.endpoint,
        order_label="order 1",
        hub=hub.buyer_hub_peer(),
    )
    provider_peer, hub_peer = config.split("[Peer]")[1:]
    assert f"PublicKey = {node.wireguard_public_key}" in provider_peer
    assert "Endpoint = 203.0.113.10:51820" in provider_peer
    assert hub_peer.strip().splitlines() == [
        f"PublicKey = {hub.hub_public_key()}",
        "AllowedIPs = 10.100.0.1/32",
        f"Endpoint = {HUB_AT}",
        "PersistentKeepalive = 25",
    ]


def test_no_hub_no_second_peer_in_the_buyers_config(settings):
    settings.MOLT_HUB_ENDPOINT = ""
    assert hub.buyer_hub_peer() is None


def test_the_hub_peers_with_live_job_peers_buyer_keys(hub_on, provider):
    node = factories.enrolled_node(provider)
    live = job_peer_on(node, "order:1")
    gone = job_peer_on(node, "order:2")
    from meshnet.peers import remove_job_peer

    remove_job_peer(gone.ref)
    device = FakeBackend()
    device.ensure_interface("molthub", hub.hub_private_key(), 51800, hub.HUB_ADDRESS)
    assert set(hub.reconcile_peers(device).values()) == {"ok"}
    assert device.list_peers().keys() == {node.wireguard_public_key, live.public_key}
    # No allowed IP for a buyer either: the hub carries no traffic.
    assert device.peers[live.public_key].allowed_ips == ()

    remove_job_peer(live.ref)
    assert hub.reconcile_peers(device) == {live.public_key: "ok"}
    assert device.list_peers().keys() == {node.wireguard_public_key}


def test_a_buyers_mapping_is_stored_and_pushed_to_the_node_as_the_peers_endpoint(
    hub_on, provider, pushes, django_capture_on_commit_callbacks
):
    node = factories.enrolled_node(provider)
    peer = job_peer_on(node)
    (spec,) = [p for p in desired_state(node).peers if p.kind == "job"]
    assert (spec.endpoint, spec.persistent_keepalive) == ("", 0)  # not known yet: none
    revision = Node.objects.get(pk=node.pk).desired_revision
    device = FakeBackend()
    device.ensure_interface("molthub", hub.hub_private_key(), 51800, hub.HUB_ADDRESS)
    hub.reconcile_peers(device)
    pushes.clear()

    # The buyer's keepalives reach the hub from its NAT's mapping.
    device.set_peer(peer.public_key, (), "198.51.100.1:40000")
    device.add_traffic(peer.public_key, 148, 92)
    with django_capture_on_commit_callbacks(execute=True):
        assert hub.discover(device) == [peer.ref]
    peer.refresh_from_db()
    assert peer.observed_endpoint == "198.51.100.1:40000" and peer.observed_endpoint_at
    node.refresh_from_db()
    assert node.desired_revision == revision + 1 and pushes == [node.pk]
    (spec,) = [p for p in desired_state(node).peers if p.kind == "job"]
    assert (spec.endpoint, spec.persistent_keepalive) == ("198.51.100.1:40000", 25)
    # What the agent plans from it: the endpoint and keepalive on the buyer's peer.
    state = wire.DesiredState.from_dict(
        wire.open_envelope(
            signed_desired_state(node), gateway_identity().public_key, wire.DESIRED_STATE
        )
    )
    (add,) = [a for a in reconcile.plan(state, {}) if a.public_key == peer.public_key]
    assert (add.endpoint, add.keepalive) == ("198.51.100.1:40000", 25)

    # Unchanged: no write, no push. The buyer's router reboots: stored and pushed again.
    with django_capture_on_commit_callbacks(execute=True):
        assert hub.discover(device) == []
    assert pushes == [node.pk]
    device.set_peer(peer.public_key, (), "198.51.100.1:50000")
    with django_capture_on_commit_callbacks(execute=True):
        assert hub.discover(device) == [peer.ref]
    assert pushes == [node.pk, node.pk]
    node.refresh_from_db()
    assert node.desired_revision == revision + 2


def test_a_rekeyed_peer_forgets_the_old_keys_mapping(hub_on, provider):
    from meshnet.peers import replace_peer_key

    node = factories.enrolled_node(provider)
    peer = job_peer_on(node)
    assert hub.record_buyer_endpoints({peer.public_key: "198.51.100.1:40000"}) == [peer.ref]
    peer = replace_peer_key(peer.ref, factories.wg_public_key())
    assert peer.observed_endpoint == ""
    # A stale read of the old key changes nothing.
    assert hub.record_buyer_endpoints({"x" * 43 + "=": "198.51.100.1:1"}) == []


def test_the_hubs_public_key_is_derived_once_per_gateway_key(settings, tmp_path, monkeypatch):
    # Every ack asks for it (agent_channel.check_ack), every state names it: an X25519 scalar
    # multiplication each time was 3% of the web process during a change to 2,000 nodes.
    settings.MOLT_STATE_DIR = tmp_path / "gateway-state"
    derived = []
    real = hub.wireguard_public_key

    def counting(private: bytes) -> bytes:
        derived.append(private)
        return real(private)

    monkeypatch.setattr(hub, "wireguard_public_key", counting)
    first = gateway_identity().wireguard_public_key_b64
    assert [hub.hub_public_key() for _ in range(3)] == [first] * 3
    assert len(derived) == 1
    derived.clear()

    rotate_gateway_key()
    new = gateway_identity().wireguard_public_key_b64
    assert [hub.hub_public_key() for _ in range(3)] == [new] * 3 and new != first
    assert len(derived) == 1
