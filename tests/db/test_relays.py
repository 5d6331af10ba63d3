"""Relays on the gateway's side (meshnet.relays): which order goes through which relay, its
`path` in the API and on the order page, the endpoints the buyer's config and the node's signed
state name, and the relays' control API. The relay process itself, with real tunnels through
it, is tests/nat/test_relay.py."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from clawnode import wire
from django.db.models import F
from django.utils import timezone

from marketplace import ledger
from marketplace.models import Order
from marketplace.orders import provision_order, stop_order
from meshnet import relays
from meshnet.desired_state import signed_desired_state
from meshnet.gateway_key import gateway_identity
from meshnet.models import JobPeer, JobPeerKey, Node, Relay, RelayAllocation
from meshnet.relay.server import parse_allocations
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

ORDERS = "/api/v1/orders/"
PAIRS = "/api/v1/relay/pairs/"


@pytest.fixture
def buyer_api(api_client_for, buyer):
    ledger.grant_credits(buyer, 100 * USD)
    return api_client_for(buyer)


def _relay(name: str, region: str, address: str, *, live: bool = True, **fields) -> Relay:
    relay = Relay.objects.create(name=name, region=region, address=address, **fields)
    relays.issue_relay_token(relay)
    if live:
        Relay.objects.filter(pk=relay.pk).update(last_seen_at=timezone.now())
    relay.refresh_from_db()
    return relay


def _order(buyer_api, listing) -> Order:
    body = {
        "listing": listing.pk,
        "gpu_count": 1,
        "hours": 2,
        "wireguard_public_key": factories.wg_public_key(),
    }
    response = buyer_api.post(ORDERS, body, format="json")
    assert response.status_code == 201, response.content
    provision_order(response.json()["id"])
    return Order.objects.select_related("job_peer").get(pk=response.json()["id"])


def _node_state_peer(node: Node, public_key: str) -> wire.PeerSpec:
    envelope = signed_desired_state(node)
    body = wire.open_envelope(envelope, gateway_identity().public_key, wire.DESIRED_STATE)
    state = wire.DesiredState.from_dict(body)
    return next(peer for peer in state.peers if peer.public_key == public_key)


def _config_endpoint(buyer_api, order: Order) -> str:
    text = buyer_api.get(f"{ORDERS}{order.pk}/wireguard.conf").content.decode()
    provider_peer = text.split("[Peer]")[1]
    return next(
        line.split(" = ")[1] for line in provider_peer.splitlines() if line.startswith("Endpoint")
    )


def test_with_no_relay_listed_an_order_goes_direct(buyer_api, listing, node):
    order = _order(buyer_api, listing)
    data = buyer_api.get(f"{ORDERS}{order.pk}/").json()
    assert data["path"] == {"kind": "direct", "relay": None, "region": None, "round_trip": None}
    assert data["endpoint"] == node.endpoint
    assert _config_endpoint(buyer_api, order) == node.endpoint
    assert not RelayAllocation.objects.exists()


def test_a_natted_nodes_order_goes_through_a_live_relay_of_its_region(
    buyer_api, listing, node, client
):
    assert node.region == "eu-west" and not node.declared_endpoint
    _relay("us-1", "us-east", "198.51.100.50")  # another region: not when its own has one
    _relay("eu-old", "eu-west", "198.51.100.51", live=False)  # silent: not live
    _relay("eu-off", "eu-west", "198.51.100.52", enabled=False)
    chosen = _relay("eu-1", "eu-west", "198.51.100.53")

    order = _order(buyer_api, listing)

    allocation = RelayAllocation.objects.get(job_peer=order.job_peer)
    assert (allocation.relay, allocation.buyer_port, allocation.provider_port) == (
        chosen,
        40000,
        40001,
    )
    data = buyer_api.get(f"{ORDERS}{order.pk}/").json()
    assert data["path"] == {
        "kind": "relayed",
        "relay": "eu-1",
        "region": "eu-west",
        "round_trip": None,
    }
    # The buyer's client sends to the relay's buyer port.
    assert data["endpoint"] == "198.51.100.53:40000"
    assert _config_endpoint(buyer_api, order) == "198.51.100.53:40000"
    # The node to its provider port, with keepalive so the relay learns where the node is
    # before the buyer's first packet: once the relay has bound the pair's ports (it reports
    # the pair), not before, when the node's first initiation would be lost there.
    spec = _node_state_peer(node, order.job_peer.public_key)
    assert (spec.endpoint, spec.persistent_keepalive) == ("", 0)
    revision = Node.objects.get(pk=node.pk).desired_revision
    relays.record_relay_poll(chosen, {"pairs": []})  # the poll that hands the relay the pair
    assert Node.objects.get(pk=node.pk).desired_revision == revision
    assert _node_state_peer(node, order.job_peer.public_key).endpoint == ""
    pair = {"id": f"peer-{order.job_peer_id}", "handshaken": False, "forwarded_bytes": 0}
    relays.record_relay_poll(chosen, {"pairs": [pair]})  # bound: it reports the pair
    node.refresh_from_db()
    assert node.desired_revision == revision + 1
    spec = _node_state_peer(node, order.job_peer.public_key)
    assert (spec.endpoint, spec.persistent_keepalive) == ("198.51.100.53:40001", 25)
    bound_at = RelayAllocation.objects.get(job_peer=order.job_peer).bound_at
    relays.record_relay_poll(chosen, {"pairs": [pair]})  # once: no revision per poll
    assert Node.objects.get(pk=node.pk).desired_revision == revision + 1
    assert RelayAllocation.objects.get(job_peer=order.job_peer).bound_at == bound_at
    # The order page shows it too.
    client.force_login(order.buyer)
    page = client.get(f"/orders/{order.pk}/").content.decode()
    assert "relayed via eu-1 (eu-west)" in page


def test_a_relay_of_any_region_serves_a_region_without_one_fewest_pairs_first(
    buyer_api, listing, node
):
    busy = _relay("any-1", "", "198.51.100.60")
    idle = _relay("any-2", "", "198.51.100.61")
    _relay("us-1", "us-east", "198.51.100.62")
    first = _order(buyer_api, listing)
    second = _order(buyer_api, listing)
    chosen = {
        RelayAllocation.objects.get(job_peer=first.job_peer).relay,
        RelayAllocation.objects.get(job_peer=second.job_peer).relay,
    }
    assert chosen == {busy, idle}


def test_ports_go_in_pairs_and_a_stopped_orders_pair_is_freed(buyer_api, listing, node):
    relay = _relay("eu-1", "eu-west", "198.51.100.53", port_low=40000, port_high=40003)
    first = _order(buyer_api, listing)
    second = _order(buyer_api, listing)
    ports = [
        (a.buyer_port, a.provider_port)
        for a in RelayAllocation.objects.filter(relay=relay).order_by("id")
    ]
    assert ports == [(40000, 40001), (40002, 40003)]
    # Full: the next order goes direct rather than failing.
    third = _order(buyer_api, listing)
    assert buyer_api.get(f"{ORDERS}{third.pk}/").json()["path"]["kind"] == "direct"
    stop_order(first)
    assert not RelayAllocation.objects.filter(job_peer=first.job_peer).exists()
    assert RelayAllocation.objects.filter(job_peer=second.job_peer).exists()
    fourth = _order(buyer_api, listing)
    assert RelayAllocation.objects.get(job_peer=fourth.job_peer).buyer_port == 40000


def test_first_free_pair():
    assert relays.first_free_pair(40000, 40005, set()) == (40000, 40001)
    assert relays.first_free_pair(40000, 40005, {40000}) == (40002, 40003)
    assert relays.first_free_pair(40000, 40005, {40000, 40002, 40004}) is None
    # An odd-sized range: the last port alone makes no pair.
    assert relays.first_free_pair(40000, 40002, {40000}) is None


@pytest.mark.parametrize(
    ("mode", "declared", "relayed"),
    [
        ("nat", "", True),
        ("nat", "203.0.113.10:51820", False),  # the provider said where it is reachable
        ("always", "203.0.113.10:51820", True),
        ("off", "", False),
    ],
)
def test_relay_mode(buyer_api, listing, node, settings, mode, declared, relayed):
    settings.MOLT_RELAY_MODE = mode
    Node.objects.filter(pk=node.pk).update(declared_endpoint=declared)
    _relay("eu-1", "eu-west", "198.51.100.53")
    order = _order(buyer_api, listing)
    assert RelayAllocation.objects.filter(job_peer=order.job_peer).exists() == relayed


def test_the_control_api_gives_a_relay_its_pairs_with_public_keys_only(
    api_client_for, buyer_api, listing, node
):
    relay = Relay.objects.create(name="eu-1", region="eu-west", address="198.51.100.53")
    token = relays.issue_relay_token(relay)
    other = _relay("eu-2", "eu-west", "198.51.100.54", live=False)
    # Stored hashed, with a prefix to find a leaked one by.
    relay.refresh_from_db()
    assert relay.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token.startswith("molt_relay_") and relay.token_prefix == token[:15]
    assert token not in str(Relay.objects.filter(pk=relay.pk).values().get())

    from rest_framework.test import APIClient

    anonymous = APIClient()
    assert anonymous.post(PAIRS, {}, format="json").status_code == 401
    wrong = APIClient(HTTP_AUTHORIZATION="Bearer molt_relay_nope")
    assert wrong.post(PAIRS, {}, format="json").status_code == 401

    relayed_api = APIClient(HTTP_AUTHORIZATION=f"Bearer {token}")
    # The first poll makes the relay live; then orders get it.
    assert relayed_api.post(PAIRS, {"status": {}}, format="json").json() == {"pairs": []}
    order = _order(buyer_api, listing)
    status = {"pairs": [{"id": f"peer-{order.job_peer_id}", "handshaken": True,
                         "fast_path": True, "forwarded_bytes": 900, "kernel_bytes": 100,
                         "buyer": "198.51.100.7:1234", "junk": "x" * 10000}],
              "fast_path": True}  # fmt: skip
    response = relayed_api.post(PAIRS, {"status": status}, format="json")
    assert response.status_code == 200
    assert response.json() == {
        "pairs": [
            {
                "id": f"peer-{order.job_peer_id}",
                "buyer_port": 40000,
                "provider_port": 40001,
                "buyer_key": order.job_peer.public_key,
                "provider_key": node.wireguard_public_key,
            }
        ]
    }
    # What the relay process makes of it (meshnet.relay.server, --control).
    (allocation,) = parse_allocations(response.content)
    assert allocation.buyer_key == order.job_peer.public_key
    assert allocation.provider_key == node.wireguard_public_key
    relay.refresh_from_db()
    assert relay.last_seen_at is not None
    # Only the numbers the ops pages show are kept.
    assert relay.last_status == {
        "pairs": [
            {"id": f"peer-{order.job_peer_id}", "handshaken": True, "fast_path": True,
             "bytes": 1000}
        ],
        "fast_path": True,
    }  # fmt: skip
    # Another relay's token gets that relay's pairs (none), and a disabled relay nothing.
    other_token = relays.issue_relay_token(other)
    other_api = APIClient(HTTP_AUTHORIZATION=f"Bearer {other_token}")
    assert other_api.post(PAIRS, {}, format="json").json() == {"pairs": []}
    Relay.objects.filter(pk=relay.pk).update(enabled=False)
    assert relayed_api.post(PAIRS, {}, format="json").status_code == 401


def test_a_relay_added_in_the_admin_shows_its_token_once(client, make_user):
    from tests.factories import staff_login

    staff = make_user("operator", is_staff=True, is_superuser=True)
    staff_login(client, staff)
    response = client.post(
        "/admin/meshnet/relay/add/",
        {"name": "eu-1", "region": "eu-west", "address": "198.51.100.53",
         "port_low": 40000, "port_high": 40999, "enabled": "on"},
        follow=True,
    )  # fmt: skip
    assert response.status_code == 200
    relay = Relay.objects.get(name="eu-1")
    page = response.content.decode()
    assert relay.token_prefix and relay.token_prefix in page
    token = page[page.index(relay.token_prefix) :].split("<")[0].split()[0]
    assert relays.authenticate_relay(token) == relay
    assert client.get("/admin/meshnet/relay/").status_code == 200


def test_the_ops_dashboard_shows_the_share_of_direct_paths_and_each_relays_load(
    buyer_api, listing, node, settings, make_user
):
    import re

    from django.test import Client

    from tests.factories import staff_login

    busy = _relay("eu-1", "eu-west", "198.51.100.53", port_low=40000, port_high=40009)
    _relay("eu-off", "eu-west", "198.51.100.52", enabled=False)
    _relay("any-old", "", "198.51.100.51", live=False)
    relayed = [_order(buyer_api, listing), _order(buyer_api, listing)]
    provisioning = _order(buyer_api, listing)  # relayed too, but not running: no path share
    settings.MOLT_RELAY_MODE = "off"
    direct = _order(buyer_api, listing)
    Order.objects.filter(pk__in=[o.pk for o in [*relayed, direct]]).update(state="running")
    assert provisioning.state != "running"
    # eu-1's poll reports two of its pairs handshaken, with their bytes.
    report = [
        {"id": f"peer-{o.job_peer_id}", "handshaken": True, "forwarded_bytes": 1024,
         "kernel_bytes": 2048 * 1024}
        for o in relayed
    ]  # fmt: skip
    relays.record_relay_poll(busy, {"pairs": report, "fast_path": True})

    operator = make_user("operator", is_staff=True)
    browser = Client()
    staff_login(browser, operator)
    html = browser.get("/ops/").content.decode()

    def text(element_id: str) -> str:
        return re.search(rf'id="{element_id}">([^<]*)<', html).group(1).strip()

    assert (text("paths-direct"), text("paths-relayed")) == ("1", "2")
    assert text("paths-direct-pct") == "33%"
    rows = dict(re.findall(r'<tr data-relay="([^"]+)">(.*?)</tr>', html, re.S))
    assert list(rows) == ["any-old", "eu-1", "eu-off"]  # any region first, then by region
    assert 'data-pairs="3">3 of 5<' in rows["eu-1"]  # the provisioning order's pair counts
    assert f'data-bytes="{2 * (1024 + 2048 * 1024)}"' in rows["eu-1"]
    assert (
        ">4 MiB<" in rows["eu-1"]
        and "just now" in rows["eu-1"]
        and 'data-health="live"' in rows["eu-1"]
    )
    assert 'data-health="disabled"' in rows["eu-off"]
    assert 'data-pairs="0"' in rows["any-old"] and 'data-health="never polled"' in rows["any-old"]


def test_the_ops_dashboard_without_relays_says_every_order_goes_direct(make_user):
    from django.test import Client

    from tests.factories import staff_login

    operator = make_user("operator", is_staff=True)
    browser = Client()
    staff_login(browser, operator)
    html = browser.get("/ops/").content.decode()
    assert 'id="no-relays"' in html
    assert 'id="paths-direct-pct">—<' in html


# --- the upgrade of a relayed path to direct (relays.start_upgrades, relays.settle_upgrades) ----


def _relayed_order_with_buyer_mapping(buyer_api, listing, node):
    relay = _relay("eu-1", "eu-west", "198.51.100.53")
    order = _order(buyer_api, listing)
    peer = order.job_peer
    JobPeer.objects.filter(pk=peer.pk).update(observed_endpoint="198.51.100.7:51820")
    return relay, order, peer


def _poll(relay: Relay, peer, forwarded: int, *, handshaken: bool = True) -> list[dict]:
    report = {
        "pairs": [{"id": f"peer-{peer.pk}", "handshaken": handshaken, "forwarded_bytes": forwarded}]
    }
    return relays.record_relay_poll(relay, report)


def _backdate(peer, *, started: int, quiet: int) -> None:
    """The upgrade began `started` seconds ago and the relay's count last moved `quiet` ago."""
    now = timezone.now()
    assert RelayAllocation.objects.filter(job_peer=peer).update(
        upgrade_started_at=now - timedelta(seconds=started),
        upgrade_relay_quiet_since=now - timedelta(seconds=quiet),
    )


def _node_received(peer, more: int) -> None:
    assert JobPeerKey.objects.filter(job_peer=peer).update(
        total_rx_bytes=F("total_rx_bytes") + more
    )


def test_a_relayed_order_goes_direct_once_its_node_declares_an_endpoint_and_the_buyer_roams(
    buyer_api, listing, node, django_capture_on_commit_callbacks, settings
):
    settings.MOLT_RELAY_TRY_DIRECT = False  # only the declared endpoint may start it here
    relay, order, peer = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    # The node still wants a relay (behind a NAT, nothing declared): a poll starts nothing.
    _poll(relay, peer, 500)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is None
    assert _node_state_peer(node, peer.public_key).endpoint == "198.51.100.53:40001"

    # The node declared where it is reachable since: the next poll starts the upgrade, a new
    # revision points the node at the buyer's mapping, the pair stays open meanwhile.
    Node.objects.filter(pk=node.pk).update(declared_endpoint="203.0.113.5:51820")
    revision = Node.objects.get(pk=node.pk).desired_revision
    with django_capture_on_commit_callbacks(execute=False) as pushes:
        pairs = _poll(relay, peer, 500)
    assert [p["id"] for p in pairs] == [f"peer-{peer.pk}"] and pushes
    node.refresh_from_db()
    assert node.desired_revision == revision + 1
    spec = _node_state_peer(node, peer.public_key)
    assert (spec.endpoint, spec.persistent_keepalive) == ("198.51.100.7:51820", 25)
    assert buyer_api.get(f"{ORDERS}{order.pk}/").json()["path"]["kind"] == "relayed"

    # The buyer's packets still crossed the relay for a while (before its client roamed): the
    # quiet period restarts there, with what the node had received then as its base.
    _backdate(peer, started=30, quiet=30)
    _node_received(peer, 4096)
    _poll(relay, peer, 700)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_relay_bytes == 700
    # Quiet, but for less than the quiet period: nothing decided, whatever the node received.
    _node_received(peer, 4096)
    _poll(relay, peer, 700)
    assert RelayAllocation.objects.filter(job_peer=peer).exists()

    # The relay carried nothing for the quiet period while the node kept receiving from the
    # buyer: its client roamed to the node. The pair is freed (the relay is told on this very
    # poll) and the path is direct; the node's state already names the buyer: no new revision.
    _backdate(peer, started=90, quiet=relays.UPGRADE_QUIET_SECONDS + 1)
    assert _poll(relay, peer, 700) == []
    assert not RelayAllocation.objects.filter(job_peer=peer).exists()
    assert buyer_api.get(f"{ORDERS}{order.pk}/").json()["path"]["kind"] == "direct"
    node.refresh_from_db()
    assert node.desired_revision == revision + 1
    assert _node_state_peer(node, peer.public_key).endpoint == "198.51.100.7:51820"


def test_no_upgrade_starts_before_the_relay_has_carried_a_handshake_of_the_pair(
    buyer_api, listing, node, settings
):
    """The direct try replaces the node's only endpoint for the buyer: started before the relay
    heard the node, it left a buyer behind a filtering NAT with no path at all (the relay had
    nowhere to send the buyer's packets, the buyer's NAT dropped the node's)."""
    settings.MOLT_RELAY_MODE, settings.MOLT_RELAY_TRY_DIRECT = "nat", True
    relay, _order, peer = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    # The relay has the pair (bound: the node is told to send there) but no handshake through
    # it yet (it heard the buyer at most).
    _poll(relay, peer, 0, handshaken=False)
    revision = Node.objects.get(pk=node.pk).desired_revision
    _poll(relay, peer, 148, handshaken=False)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is None
    assert Node.objects.get(pk=node.pk).desired_revision == revision
    assert _node_state_peer(node, peer.public_key).endpoint == "198.51.100.53:40001"
    # A relay that does not name the pair at all starts nothing either.
    relays.record_relay_poll(relay, {"pairs": []})
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is None

    # Handshaken through the relay (and quiet since the last poll): now the node is told to try
    # the buyer's mapping.
    _poll(relay, peer, 444)
    _poll(relay, peer, 444)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None
    node.refresh_from_db()
    assert node.desired_revision == revision + 1
    assert _node_state_peer(node, peer.public_key).endpoint == "198.51.100.7:51820"


def test_no_upgrade_starts_while_the_relayed_tunnel_carries_traffic(
    buyer_api, listing, node, settings
):
    """WireGuard roams to the source of the latest packet: a buyer packet still crossing the
    relay when the node moved to the buyer's mapping roamed the node back, and the buyer with
    it. The try starts in a pause: the relay's count unchanged since its previous poll."""
    settings.MOLT_RELAY_MODE, settings.MOLT_RELAY_TRY_DIRECT = "nat", True
    relay, _order, peer = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    for count in (9_000, 80_000, 2_400_000, 2_400_100):
        _poll(relay, peer, count)
        assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is None, count
    # The first poll after a restart of the gateway's record (nothing before) is not a pause.
    Relay.objects.filter(pk=relay.pk).update(last_status={})
    _poll(relay, peer, 2_400_100)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is None
    _poll(relay, peer, 2_400_100)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None
    assert _node_state_peer(node, peer.public_key).endpoint == "198.51.100.7:51820"


def test_an_upgrade_the_buyers_nat_does_not_let_through_goes_back_to_the_relay(
    buyer_api, listing, node, settings
):
    relay, order, peer = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    settings.MOLT_RELAY_MODE = "off"  # the operator turned relays off: live pairs try direct
    _poll(relay, peer, 500)
    _poll(relay, peer, 500)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None

    # An idle tunnel proves nothing: the relay quiet, but the node received nothing either.
    _backdate(peer, started=90, quiet=90)
    _poll(relay, peer, 500)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None

    # The relay kept carrying the tunnel (the buyer's NAT dropped the node's direct packets and
    # the buyer's next packet through the relay roamed the node back) until the deadline: the
    # upgrade is dropped and the node's side goes back to the relay, in a new revision.
    revision = Node.objects.get(pk=node.pk).desired_revision
    _node_received(peer, 4096)
    _poll(relay, peer, 900)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None
    _backdate(peer, started=relays.UPGRADE_GIVE_UP_SECONDS + 1, quiet=1)
    _node_received(peer, 4096)
    pairs = _poll(relay, peer, 1300)
    allocation = RelayAllocation.objects.get(job_peer=peer)
    assert allocation.upgrade_started_at is None and allocation.upgrade_failed_at is not None
    assert [p["id"] for p in pairs] == [f"peer-{peer.pk}"]
    node.refresh_from_db()
    assert node.desired_revision == revision + 1
    assert _node_state_peer(node, peer.public_key).endpoint == "198.51.100.53:40001"
    assert buyer_api.get(f"{ORDERS}{order.pk}/").json()["path"]["kind"] == "relayed"
    # Tried once: later polls do not start it again (no revision back and forth).
    _poll(relay, peer, 1700)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is None


@pytest.mark.parametrize(
    ("mode", "try_direct", "tried"),
    [("nat", True, True), ("nat", False, False), ("always", True, False)],
)
def test_a_natted_nodes_relayed_pair_tries_direct_once_the_buyers_mapping_is_known(
    buyer_api, listing, node, settings, mode, try_direct, tried
):
    """Relayed first, then one try at the direct path (as Tailscale starts on DERP): a node
    behind a NAT, nothing declared, relayed by "nat"; once the hub has seen the buyer, the next
    poll starts the upgrade: the node's state names the buyer's mapping, the pair stays open.
    Not when the operator turned it off, nor under "always" (relays by policy)."""
    settings.MOLT_RELAY_TRY_DIRECT = try_direct
    settings.MOLT_RELAY_MODE = mode
    relay, order, peer = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    assert RelayAllocation.objects.filter(job_peer=peer).exists()

    _poll(relay, peer, 500)
    pairs = _poll(relay, peer, 500)  # quiet since the last poll

    allocation = RelayAllocation.objects.get(job_peer=peer)
    assert (allocation.upgrade_started_at is not None) == tried
    assert [p["id"] for p in pairs] == [f"peer-{peer.pk}"]  # the relay keeps the tunnel
    expected = "198.51.100.7:51820" if tried else "198.51.100.53:40001"
    assert _node_state_peer(node, peer.public_key).endpoint == expected
    assert buyer_api.get(f"{ORDERS}{order.pk}/").json()["path"]["kind"] == "relayed"


def test_without_the_buyers_mapping_no_upgrade_starts(buyer_api, listing, node):
    relay = _relay("eu-1", "eu-west", "198.51.100.53")
    order = _order(buyer_api, listing)
    Node.objects.filter(pk=node.pk).update(declared_endpoint="203.0.113.5:51820")
    _poll(relay, order.job_peer, 500)
    _poll(relay, order.job_peer, 500)
    # The node would have nowhere to send: it stays on the relay.
    assert RelayAllocation.objects.get(job_peer=order.job_peer).upgrade_started_at is None


def test_the_ops_dashboards_relay_card_costs_the_same_queries_with_four_times_the_relays(
    buyer_api, listing, node, make_user
):
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from tests.factories import staff_login

    operator = make_user("operator", is_staff=True)
    browser = Client()
    staff_login(browser, operator)

    def queries() -> int:
        browser.get("/ops/")  # warm: session, content types
        with CaptureQueriesContext(connection) as captured:
            assert browser.get("/ops/").status_code == 200
        return len(captured)

    first = _relay("any-0", "", "198.51.100.70")
    relays.record_relay_poll(first, {"pairs": [], "fast_path": True})
    _order(buyer_api, listing)
    once = queries()
    for i in range(1, 4):  # the listing has four GPUs: one order each
        _relay(f"any-{i}", "", f"198.51.100.7{i}")
        _order(buyer_api, listing)
    assert RelayAllocation.objects.values("relay").distinct().count() == 4
    assert queries() == once


def test_a_relays_report_settles_only_its_own_pairs_upgrades(buyer_api, listing, node, settings):
    """A relay names pairs by job peer id; one that names another relay's pair (a stale or a
    wrong report) neither frees it as direct nor gives its upgrade up."""
    relay, _order, peer = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    settings.MOLT_RELAY_MODE = "off"
    _poll(relay, peer, 500)
    _poll(relay, peer, 500)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None
    other = _relay("eu-2", "eu-west", "198.51.100.54")
    _backdate(peer, started=relays.UPGRADE_GIVE_UP_SECONDS + 1, quiet=relays.UPGRADE_QUIET_SECONDS)
    _node_received(peer, 4096)
    before = RelayAllocation.objects.get(job_peer=peer)

    decided = relays.settle_upgrades(other, {peer.pk: 900}, timezone.now())
    _poll(other, peer, 900)

    assert decided == {"direct": 0, "relayed": 0}
    after = RelayAllocation.objects.get(job_peer=peer)
    assert after.upgrade_started_at == before.upgrade_started_at
    assert (after.upgrade_relay_bytes, after.upgrade_failed_at) == (500, None)
    # Its own relay's report decides it: quiet for the period, the node received: direct. (A
    # row with no quiet start recorded counts its quiet from the upgrade's start.)
    RelayAllocation.objects.filter(job_peer=peer).update(upgrade_relay_quiet_since=None)
    assert relays.settle_upgrades(relay, {peer.pk: 500}, timezone.now()) == {
        "direct": 1,
        "relayed": 0,
    }


def test_a_pair_the_relay_did_not_report_does_not_hold_up_its_other_pairs(
    buyer_api, listing, node, settings
):
    relay, _first_order, first = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    second = _order(buyer_api, listing).job_peer
    JobPeer.objects.filter(pk=second.pk).update(observed_endpoint="198.51.100.8:51820")
    settings.MOLT_RELAY_MODE = "off"
    for peer in (first, second):
        _poll(relay, peer, 500)
        _poll(relay, peer, 500)
        assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None
        _backdate(peer, started=90, quiet=relays.UPGRADE_QUIET_SECONDS + 1)
        _node_received(peer, 4096)
    # Both started in the same instant: deciding one must not decide the other.
    RelayAllocation.objects.filter(job_peer__in=[first, second]).update(
        upgrade_started_at=timezone.now() - timedelta(seconds=90)
    )

    # This poll names the second pair only (the first's count was not read this time).
    decided = relays.settle_upgrades(relay, {second.pk: 500}, timezone.now())

    assert decided == {"direct": 1, "relayed": 0}
    assert not RelayAllocation.objects.filter(job_peer=second).exists()
    assert RelayAllocation.objects.get(job_peer=first).upgrade_started_at is not None


def test_without_the_buyers_mapping_a_pair_cannot_go_direct_whatever_the_mode(
    buyer_api, listing, node, settings
):
    _relay("eu-1", "eu-west", "198.51.100.53")
    peer = _order(buyer_api, listing).job_peer
    settings.MOLT_RELAY_MODE = "off"  # the node no longer wants a relay

    def allocation():
        return RelayAllocation.objects.select_related("job_peer__node").get(job_peer=peer)

    assert not relays.can_go_direct(allocation())
    JobPeer.objects.filter(pk=peer.pk).update(observed_endpoint="198.51.100.7:51820")
    assert relays.can_go_direct(allocation())


def test_traffic_through_the_relay_restarts_the_quiet_period_from_what_the_node_had_then(
    buyer_api, listing, node, settings
):
    """Direct needs a quiet relay AND the node receiving from the buyer since the quiet began:
    relayed traffic rebases both, so neither an earlier quiet nor bytes the node received
    before it count."""
    relay, _order, peer = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    settings.MOLT_RELAY_MODE = "off"
    _poll(relay, peer, 500)
    _poll(relay, peer, 500)
    _backdate(peer, started=200, quiet=200)
    _node_received(peer, 4096)
    _poll(relay, peer, 900)  # the relay carried some: quiet from now, rx counted from now
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_peer_rx == peer.traffic_totals()[0]

    # Quiet long enough since, but the node received nothing more: an idle tunnel, not direct.
    _backdate(peer, started=250, quiet=relays.UPGRADE_QUIET_SECONDS + 1)
    _poll(relay, peer, 900)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None

    # Traffic again, then the node receives: quiet only just began, nothing decided yet.
    _poll(relay, peer, 950)
    _node_received(peer, 4096)
    _poll(relay, peer, 950)
    assert RelayAllocation.objects.get(job_peer=peer).upgrade_started_at is not None


def test_the_nodes_own_region_is_preferred_to_an_any_region_relay_with_fewer_pairs(
    buyer_api, listing, node
):
    own = _relay("eu-1", "eu-west", "198.51.100.53")
    _relay("any-1", "", "198.51.100.60")
    first = _order(buyer_api, listing)
    second = _order(buyer_api, listing)  # eu-1 has a pair now, any-1 none: still eu-1
    for order in (first, second):
        assert RelayAllocation.objects.get(job_peer=order.job_peer).relay == own


def test_every_pair_a_poll_decides_is_decided_and_the_periods_end_on_the_second(
    buyer_api, listing, node, settings
):
    """Two pairs quiet for exactly UPGRADE_QUIET_SECONDS with the node receiving go direct on
    the same poll, both counted; one exactly UPGRADE_GIVE_UP_SECONDS old goes back."""
    relay, _first_order, first = _relayed_order_with_buyer_mapping(buyer_api, listing, node)
    second = _order(buyer_api, listing).job_peer
    third = _order(buyer_api, listing).job_peer
    JobPeer.objects.filter(pk__in=[second.pk, third.pk]).update(
        observed_endpoint="198.51.100.8:51820"
    )
    settings.MOLT_RELAY_MODE = "off"
    for peer in (first, second, third):
        _poll(relay, peer, 500)
        _poll(relay, peer, 500)
        _node_received(peer, 4096)
    now = timezone.now()
    quiet = now - timedelta(seconds=relays.UPGRADE_QUIET_SECONDS)
    RelayAllocation.objects.filter(job_peer__in=[first, second]).update(
        upgrade_started_at=quiet, upgrade_relay_quiet_since=quiet
    )
    # The third: traffic all along (its count moves on this poll), its deadline now.
    RelayAllocation.objects.filter(job_peer=third).update(
        upgrade_started_at=now - timedelta(seconds=relays.UPGRADE_GIVE_UP_SECONDS)
    )

    decided = relays.settle_upgrades(relay, {first.pk: 500, second.pk: 500, third.pk: 600}, now)

    assert decided == {"direct": 2, "relayed": 1}
    assert not RelayAllocation.objects.filter(job_peer__in=[first, second]).exists()
    assert RelayAllocation.objects.get(job_peer=third).upgrade_failed_at == now
