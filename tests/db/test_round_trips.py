"""Each order's latest round-trip time (issue 11): the node's signed ROUND_TRIPS report
(clawnode.rtt) stored on the job peer (meshnet.round_trips), refused whole with nothing written
when anything in it is wrong, and shown with its time in the order's `path` (API) and with its
age on the order page, "no answer" where the buyer's host stayed silent. The pings themselves
cross real tunnels in tests/netns/test_round_trip.py."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from clawnode import rtt as agent_rtt
from clawnode import wire
from clawnode.keys import Identity
from django.utils import timezone

from frontend.order_state import round_trip_view
from marketplace import ledger
from marketplace.demo_data import enrol_node
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import provision_order
from meshnet.models import JobPeer, Node
from meshnet.round_trips import RoundTripsRefused, record_round_trips
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

ORDERS = "/api/v1/orders/"


# The node's identity signs the reports: the shared `node` fixture does not keep it.
@pytest.fixture
def enrolled(provider) -> tuple[Node, Identity]:
    return enrol_node(
        provider, hostname="rack-3", gpus=[factories.gpu(i) for i in range(4)],
        observed_ip="203.0.113.42", endpoint="203.0.113.42:51820",
    )  # fmt: skip


@pytest.fixture
def buyer_api(api_client_for, buyer):
    ledger.grant_credits(buyer, 100 * USD)
    return api_client_for(buyer)


def order_on(buyer_api, node: Node) -> Order:
    listing = create_listing(
        node.owner, node=node, gpu_count=1, price_per_gpu_hour=2 * USD, price_per_gib=10_000
    )
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


def report(identity: Identity, *peers: wire.RoundTrip, at: int | None = None, node_id=None):
    body = wire.RoundTrips(
        node_id=node_id or identity.node_id,
        measured_at=int(time.time()) if at is None else at,
        peers=peers,
    ).to_dict()
    return wire.signed_envelope(wire.ROUND_TRIPS, body, identity)


def answered(peer: JobPeer, us: int) -> wire.RoundTrip:
    return wire.RoundTrip(peer.public_key, peer.ref, answered=True, rtt_us=us)


def silent(peer: JobPeer) -> wire.RoundTrip:
    return wire.RoundTrip(peer.public_key, peer.ref, answered=False)


def test_a_report_stores_each_peers_round_trip_and_no_answer(buyer_api, enrolled):
    node, identity = enrolled
    one, two = order_on(buyer_api, node).job_peer, order_on(buyer_api, node).job_peer
    at = int(time.time())

    assert (
        record_round_trips(node, report(identity, answered(one, 23_456), silent(two), at=at)) == 2
    )

    one.refresh_from_db()
    two.refresh_from_db()
    assert (one.rtt_us, int(one.rtt_measured_at.timestamp())) == (23_456, at)
    assert (two.rtt_us, int(two.rtt_measured_at.timestamp())) == (None, at)


def test_an_older_or_replayed_report_changes_nothing(buyer_api, enrolled):
    node, identity = enrolled
    peer = order_on(buyer_api, node).job_peer
    now = int(time.time())
    fresh = report(identity, silent(peer), at=now)
    assert record_round_trips(node, fresh) == 1

    assert record_round_trips(node, report(identity, answered(peer, 900), at=now - 60)) == 0
    assert record_round_trips(node, fresh) == 0

    peer.refresh_from_db()
    assert peer.rtt_us is None and int(peer.rtt_measured_at.timestamp()) == now


@pytest.mark.parametrize(
    ("forge", "says"),
    [
        (lambda ident, node, p: report(Identity.generate(), answered(p, 5), node_id=node.node_id),
         "signature"),
        (lambda ident, node, p: report(ident, answered(p, 5), node_id="nd_" + "0" * 32),
         "another node"),
        (lambda ident, node, p: report(ident, answered(p, 5), at=int(time.time()) - 3600),
         "refused"),
        (lambda ident, node, p: wire.signed_envelope(
            wire.CONNECTIVITY, report(ident, answered(p, 5))["body"], ident), "refused"),
        (lambda ident, node, p: {**report(ident), "body": {
            **report(ident)["body"], "peers": [{**answered(p, 5).to_dict(), "rtt_us": -1}]}},
         "refused"),
        (lambda ident, node, p: report(ident, answered(p, 5), answered(p, 6)), "named twice"),
        (lambda ident, node, p: report(
            ident, answered(p, 5), wire.RoundTrip(p.public_key, "order:999999", True, 5)),
         "order:999999"),
    ],
)  # fmt: skip
def test_a_bad_report_is_refused_with_a_clear_error_and_nothing_is_written(
    buyer_api, enrolled, forge, says
):
    node, identity = enrolled
    peer = order_on(buyer_api, node).job_peer

    with pytest.raises(RoundTripsRefused, match=says):
        record_round_trips(node, forge(identity, node, peer))

    peer.refresh_from_db()
    assert (peer.rtt_measured_at, peer.rtt_us) == (None, None)


def test_a_report_about_a_peer_of_another_node_is_refused_whole(buyer_api, enrolled, carol):
    node, identity = enrolled
    other, _ = enrol_node(
        carol, hostname="elsewhere", gpus=[factories.gpu(0)], observed_ip="203.0.113.43",
        endpoint="203.0.113.43:51820",
    )  # fmt: skip
    mine, theirs = order_on(buyer_api, node).job_peer, order_on(buyer_api, other).job_peer

    with pytest.raises(RoundTripsRefused, match=f"{theirs.ref} with key .* not a job peer of"):
        record_round_trips(node, report(identity, answered(mine, 700), answered(theirs, 700)))

    for peer in (mine, theirs):
        peer.refresh_from_db()
        assert (peer.rtt_measured_at, peer.rtt_us) == (None, None)  # not even this node's own


def test_the_order_api_and_page_show_the_round_trip_with_its_time_and_no_answer(
    buyer_api, enrolled, client
):
    node, identity = enrolled
    order = order_on(buyer_api, node)
    client.force_login(order.buyer)
    before = buyer_api.get(f"{ORDERS}{order.pk}/").json()["path"]
    assert before == {"kind": "direct", "relay": None, "region": None, "round_trip": None}
    # The page's row itself (the snapshot its script reads carries the label too).
    page = client.get(f"/orders/{order.pk}/").content.decode()
    assert '<dt>Round trip</dt><dd id="round-trip">not measured yet</dd>' in page

    at = int(time.time()) - 40
    record_round_trips(node, report(identity, answered(order.job_peer, 12_345), at=at))

    trip = buyer_api.get(f"{ORDERS}{order.pk}/").json()["path"]["round_trip"]
    assert trip["answered"] is True and trip["ms"] == 12.345
    assert abs(timezone.datetime.fromisoformat(trip["measured_at"]).timestamp() - at) < 1
    page = client.get(f"/orders/{order.pk}/").content.decode()
    assert re.search(r'<dd id="round-trip">12 ms \(measured \d+ s ago\)</dd>', page)

    record_round_trips(node, report(identity, silent(order.job_peer)))

    trip = buyer_api.get(f"{ORDERS}{order.pk}/").json()["path"]["round_trip"]
    assert (trip["answered"], trip["ms"]) == (False, None)
    page = client.get(f"/orders/{order.pk}/").content.decode()
    assert re.search(r'<dd id="round-trip">no answer \(measured \d+ s ago\)</dd>', page)


def test_the_page_writes_a_round_trip_and_its_age_in_words():
    now = timezone.now()

    def view(ms, ago):
        return round_trip_view({"ms": ms, "measured_at": now - ago}, now)["label"]

    assert view(0.412, timedelta(seconds=5)) == "0.4 ms (measured 5 s ago)"
    assert view(23.6, timedelta(minutes=3, seconds=5)) == "24 ms (measured 3 min ago)"
    assert view(None, timedelta(hours=2)) == "no answer (measured 2 h ago)"
    assert round_trip_view(None) is None


def test_the_agents_frame_is_what_the_gateway_stores(buyer_api, enrolled):
    """The agent's own frame (clawnode.rtt.frame of a measured round) goes in unchanged."""
    node, identity = enrolled
    peer = order_on(buyer_api, node).job_peer
    pinger = agent_rtt.FakePinger({peer.address: 0.0031})
    target = agent_rtt.Target(peer.public_key, peer.ref, peer.address)

    frame = agent_rtt.frame(identity, agent_rtt.measure(pinger, node.mesh_address, [target]))

    assert record_round_trips(node, frame["envelope"]) == 1
    peer.refresh_from_db()
    assert peer.rtt_us == 3100


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_agents_socket_names_the_frame_in_its_welcome_and_stores_it(
    settings, buyer_api, enrolled
):
    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator
    from clawnode import frames

    from config.asgi import application
    from meshnet import agent_guard

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    agent_guard.reset()
    node, identity = enrolled
    peer = order_on(buyer_api, node).job_peer

    async def session() -> dict:
        socket = WebsocketCommunicator(application, "/ws/agent/")
        socket.scope["client"] = ("198.51.100.21", 40000)
        connected, _ = await socket.connect()
        assert connected
        challenge = await socket.receive_json_from(timeout=5)
        await socket.send_json_to(frames.auth(identity, challenge["challenge"]))
        welcome = await socket.receive_json_from(timeout=5)
        assert (await socket.receive_json_from(timeout=5))["type"] == "desired_state"
        await socket.send_json_to(agent_rtt.frame(identity, [answered(peer, 4_200)]))
        # A frame about a key this node does not have closes the socket as a bad message.
        stranger = wire.RoundTrip(factories.wg_public_key(), peer.ref, True, 5)
        await socket.send_json_to(agent_rtt.frame(identity, [stranger]))
        assert (await socket.receive_json_from(timeout=5))["type"] == "error"
        assert await socket.receive_output(timeout=5) == {
            "type": "websocket.close",
            "code": wire.CLOSE_BAD_MESSAGE,
        }
        await socket.disconnect()
        return welcome

    welcome = async_to_sync(session)()

    assert welcome["type"] == "welcome" and "round_trips" in welcome["accepts"]
    peer.refresh_from_db()
    assert peer.rtt_us == 4_200
    agent_guard.reset()
