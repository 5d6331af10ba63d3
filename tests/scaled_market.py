"""The demo market, N times over, with orders in every state: the data the ops dashboard's
query-count test, the page query-count tests and benchmarks/pages.py measure the pages against.
Everything goes through the real services (signed enrolment, listings, orders with holds,
acknowledgements, traffic, settlement, disputes, payouts), so the rows are the ones a running
gateway would have. The one exception is the metering samples of `history=True`: they are
signed by the node's identity exactly as the agent signs them but stored in bulk, because
ingesting tens of thousands one by one would make the seeding the slowest part of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from clawnode import wire
from clawnode.keys import Identity
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.utils import timezone

from marketplace import ledger, payments
from marketplace.demo_data import PROVIDERS, enrol_demo_node
from marketplace.listings import create_listing
from marketplace.models import Listing, Order
from marketplace.orders import add_traffic, fail_order, place_order, provision_order, stop_order
from marketplace.reliability import refresh_reliability
from marketplace.tokens import issue_api_token
from meshnet.agent_channel import acknowledge_revision, record_report
from meshnet.models import JobPeer, JobPeerKey, MeteringSample, Node
from meshnet.nodes import record_heartbeat
from tests.factories import USD, wg_public_key

PASSWORD = make_password("scaled-market-pass")  # hashed once: hashing per user is the slow part

# The history's orders run on this many listings (on distinct nodes) of each copy, and the
# metering samples of those nodes cover this many hours before now: every ended order of the
# history ran inside it.
HISTORY_LISTINGS = 4
SAMPLE_HOURS = 6


@dataclass
class Copy:
    providers: list = field(default_factory=list)
    buyer: object = None
    nodes: list[Node] = field(default_factory=list)
    listings: list[Listing] = field(default_factory=list)
    orders: dict[str, list[Order]] = field(default_factory=dict)
    # The node identities (the agent's signing keys): metering samples are signed with them.
    identities: dict[int, Identity] = field(default_factory=dict)
    # With history=True: another buyer of this copy, and the measured buyer's extra orders by
    # state (`orders` keeps seed_copy's own six, which the ops dashboard's tests count on).
    other_buyer: object = None
    history: dict[str, list[Order]] = field(default_factory=dict)


def _user(username: str):
    return get_user_model().objects.create(username=username, password=PASSWORD)


def _ack(node: Node, at=None) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


def _order(buyer, listing: Listing, *, hours: int = 2) -> Order:
    return place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=hours, wireguard_public_key=wg_public_key()
    )


def _user_once(username: str):
    found = get_user_model().objects.filter(username=username).first()
    return found or _user(username)


def seed_copy(index: int, *, shared_users: bool = False) -> Copy:
    """One copy of the demo market (seed_demo's providers and nodes) and, on its biggest
    listing, orders: two completed and settled with traffic, one failed, one cancelled, one
    running, one pending. Half the nodes have a heartbeat; one has a complaint on record.

    Each copy has users of its own, or with `shared_users` the same providers and buyer get
    every copy's nodes, listings and orders (their own pages then hold N times the demo)."""
    copy = Copy()
    name = (lambda base: base) if shared_users else (lambda base: f"{base}-{index}")
    make = _user_once if shared_users else _user
    for demo_user, demo_nodes in PROVIDERS:
        provider = make(name(demo_user.username))
        copy.providers.append(provider)
        for demo_node in demo_nodes:
            # The identity is kept (seed_demo drops it) so that the node's metering samples can
            # be signed the way its agent would sign them.
            node, identity = enrol_demo_node(provider, demo_node)
            copy.nodes.append(node)
            copy.identities[node.pk] = identity
            for demo_listing in demo_node.listings:
                terms = demo_node.listing_terms(demo_listing)
                copy.listings.append(create_listing(provider, node=node, **terms))
    for node in copy.nodes[::2]:
        record_heartbeat(node, node.observed_ip)
    record_report(copy.nodes[-1], "desired state refused: bad signature (scaled market)")

    copy.buyer = make(name("buyer"))
    ledger.grant_credits(copy.buyer, 5_000 * USD, memo=f"scaled market {index}")
    biggest = max(copy.listings, key=lambda listing: listing.gpu_count)
    node = biggest.node
    orders: dict[str, list[Order]] = {state: [] for state in Order.State.values}
    for _ in range(2):
        order = _order(copy.buyer, biggest)
        provision_order(order.pk)
        _ack(node, at=timezone.now() - timedelta(minutes=40))
        peer = JobPeer.objects.get(ref=f"order:{order.pk}")
        add_traffic(peer, rx_bytes=300 * 2**20, tx_bytes=2 * 2**30)
        stop_order(Order.objects.get(pk=order.pk))
        _ack(node)
        orders["completed"].append(Order.objects.get(pk=order.pk))
    failed = _order(copy.buyer, biggest)
    provision_order(failed.pk)
    fail_order(failed, "the provider node did not acknowledge in time")
    orders["failed"].append(failed)
    cancelled = _order(copy.buyer, biggest)
    stop_order(cancelled, reason="changed my mind")
    orders["cancelled"].append(cancelled)
    running = _order(copy.buyer, biggest)
    provision_order(running.pk)
    _ack(node)
    orders["running"].append(running)
    orders["pending"].append(_order(copy.buyer, biggest))
    copy.orders = orders
    return copy


# --- a buyer's history ---------------------------------------------------------------------------


def _history_listings(copy: Copy) -> list[Listing]:
    """The copy's biggest listing and the next biggest on other nodes."""
    chosen: list[Listing] = []
    for listing in sorted(copy.listings, key=lambda item: (-item.gpu_count, item.pk)):
        if all(listing.node_id != other.node_id for other in chosen):
            chosen.append(listing)
    return chosen[:HISTORY_LISTINGS]


def _provisioned_at(order: Order, placed: datetime) -> JobPeer:
    """Provision `order` as if it had been placed and provisioned at `placed`: the order, its
    job peer and the peer's key are backdated like the acknowledgements that follow, so that
    the metering samples of that time are the key's (the chart reads them by key lifetime)."""
    Order.objects.filter(pk=order.pk).update(created_at=placed)
    provision_order(order.pk)
    peer = JobPeer.objects.get(ref=f"order:{order.pk}")
    JobPeer.objects.filter(pk=peer.pk).update(created_at=placed)
    JobPeerKey.objects.filter(job_peer=peer).update(active_from=placed)
    return peer


def _ran(buyer, listing: Listing, *, start: datetime, minutes: int, rx: int, tx: int) -> Order:
    """An order that ran from `start` for `minutes` with traffic, stopped by the buyer and
    settled when the agent acknowledged the removal."""
    order = _order(buyer, listing)
    peer = _provisioned_at(order, start - timedelta(minutes=1))
    _ack(listing.node, at=start)
    add_traffic(peer, rx_bytes=rx, tx_bytes=tx)
    stop_order(Order.objects.get(pk=order.pk))
    end = start + timedelta(minutes=minutes)
    # Backdated like the acknowledgements, so the bill covers the run and not until now.
    Order.objects.filter(pk=order.pk).update(stop_requested_at=end)
    _ack(listing.node, at=end)
    return Order.objects.get(pk=order.pk)


def _running(buyer, listing: Listing, *, since: datetime, rx: int, tx: int) -> Order:
    order = _order(buyer, listing, hours=6)
    peer = _provisioned_at(order, since - timedelta(minutes=1))
    _ack(listing.node, at=since)
    add_traffic(peer, rx_bytes=rx, tx_bytes=tx)
    return Order.objects.get(pk=order.pk)


def seed_history(copy: Copy, index: int, *, operator) -> None:
    """On top of seed_copy: the copy's buyer gets a history on HISTORY_LISTINGS listings (eight
    orders that ran and settled with traffic, in the last SAMPLE_HOURS hours; two of them
    disputed, one dispute resolved with a partial refund; a failed and a cancelled one after
    provisioning; two running, one provisioning, one stopping, one pending) and three API
    tokens; another buyer of its own gets three settled, one cancelled, one failed and one
    running order. Each provider asks for a payout of half its earnings, paid in even copies."""
    now = timezone.now()
    # The dispute window of everything settled before this copy's history has passed: its
    # frozen shares go to the providers' earnings (payouts below draw on them), while this
    # copy's own stay frozen, so the last copy's orders can still be disputed.
    window = timedelta(seconds=settings.MOLT_DISPUTE_WINDOW_SECONDS)
    payments.release_due_earnings(now=now + window + timedelta(seconds=1))
    listings = _history_listings(copy)
    buyer = copy.buyer
    history: dict[str, list[Order]] = {state: [] for state in Order.State.values}
    ran = []
    for slot in range(2):
        for j, listing in enumerate(listings):
            start = now - timedelta(hours=5 - 2 * slot, minutes=10 * j)
            ran.append(
                _ran(
                    buyer,
                    listing,
                    start=start,
                    minutes=50,
                    rx=(j + 1) * 100 * 2**20,
                    tx=(slot + 1) * 2**30,
                )
            )
    disputed = [
        payments.open_dispute(order, buyer, "the GPUs were slower than listed") for order in ran[:2]
    ]
    payments.resolve_dispute(
        disputed[0],
        refund=disputed[0].order.settlement.captured // 2,
        operator=operator,
        note="half back: throttled for part of the run",
    )
    for order in ran:
        order.refresh_from_db()
        history[order.state].append(order)

    other = _user(f"other-buyer-{index}")
    copy.other_buyer = other
    ledger.grant_credits(other, 1_000 * USD, memo=f"scaled market other buyer {index}")
    for slot, listing in enumerate(listings[1:]):
        start = now - timedelta(hours=4 - slot, minutes=5)
        _ran(other, listing, start=start, minutes=40, rx=50 * 2**20, tx=512 * 2**20)

    failed = _order(buyer, listings[3])
    provision_order(failed.pk)
    fail_order(failed, "provider node revoked: scaled market")
    history["failed"].append(failed)
    cancelled = _order(buyer, listings[2])
    provision_order(cancelled.pk)
    stop_order(cancelled, reason="changed my mind after provisioning")
    history["cancelled"].append(cancelled)
    changed_mind = _order(other, listings[1])
    provision_order(changed_mind.pk)
    stop_order(changed_mind, reason="ordered the wrong GPU")
    fail_order(_order(other, listings[3]), "the provider node did not acknowledge in time")

    # Live orders last: an acknowledgement on a node after them would move them on.
    an_hour_ago = now - timedelta(hours=1)
    for listing in (listings[0], listings[1]):
        running = _running(buyer, listing, since=an_hour_ago, rx=80 * 2**20, tx=700 * 2**20)
        history["running"].append(running)
    _running(other, listings[0], since=now - timedelta(minutes=30), rx=2**20, tx=2**20)
    stopping = _running(buyer, listings[2], since=now - timedelta(minutes=90), rx=2**20, tx=2**30)
    history["stopping"].append(stop_order(stopping))
    provisioning = _order(buyer, listings[3])
    history["provisioning"].append(provision_order(provisioning.pk))
    history["pending"].append(_order(buyer, listings[1]))
    copy.history = history

    for n in range(3):
        issue_api_token(buyer, name=f"copy {index} token {n}")
    for provider in copy.providers:
        earnings = ledger.earnings_for(provider)
        if earnings >= 2:
            payout = payments.request_payout(provider, earnings // 2)
            if index % 2 == 0:
                payments.mark_payout_paid(payout, operator=operator, reference=f"bank {index}")


def _signed_sample_row(node, identity, boot_id: str, seq: int, at, peers) -> MeteringSample:
    """One metering sample of `node` as its agent signs it, stored as ingestion stores it
    (received 300 ms after it was taken)."""
    body = wire.MeteringSample(
        node_id=node.node_id,
        boot_id=boot_id,
        seq=seq,
        sampled_at=int(at.timestamp()),
        peers=tuple(peers),
    ).to_dict()
    return MeteringSample(
        node=node,
        boot_id=boot_id,
        seq=seq,
        sampled_at=datetime.fromtimestamp(body["sampled_at"], tz=UTC),
        received_at=at + timedelta(milliseconds=300),
        body=body,
        signature=wire.signed_envelope(wire.METERING, body, identity)["signature"],
    )


def seed_samples(copy: Copy, *, every_s: int, hours: int = SAMPLE_HOURS) -> int:
    """Every `every_s` seconds of the last `hours`, a metering sample of each history node as
    its agent would send it: the cumulative counters of every peer live on the node at that
    moment (growing evenly to the bytes its order was billed), signed by the node's identity.
    Returns how many were stored."""
    now = timezone.now().replace(microsecond=0)
    first = now - timedelta(hours=hours)
    rows = []
    for listing in _history_listings(copy):
        node = listing.node
        identity = copy.identities[node.pk]
        boot_id = wire.new_nonce()
        runs = [
            (order.wireguard_public_key, order.running_since, order.ended_at or now, order)
            for order in Order.objects.filter(listing__node=node, running_since__isnull=False)
        ]
        at, seq = first, 0
        while at <= now:
            peers = []
            for key, start, end, order in runs:
                if start <= at <= end:
                    done = (at - start) / max(end - start, timedelta(seconds=1))
                    peers.append(
                        wire.PeerCounters(
                            public_key=key,
                            epoch=1,
                            rx_bytes=int(order.bytes_out * done),
                            tx_bytes=int(order.bytes_in * done),
                        )
                    )
            seq += 1
            rows.append(
                _signed_sample_row(
                    node, identity, boot_id, seq, at, sorted(peers, key=lambda p: p.public_key)
                )
            )
            at += timedelta(seconds=every_s)
    MeteringSample.objects.bulk_create(rows, batch_size=2000)
    return len(rows)


def seed_older_samples(copy: Copy, node: Node, *, days: int, every_s: int = 10) -> int:
    """`days` more days of `node`'s metering before its earliest sample, as an agent sends them
    with no job on the node (an empty peer list), from an earlier boot, signed by the node's
    identity: a node that has been on the mesh a while. Returns how many were stored."""
    earliest = MeteringSample.objects.filter(node=node).order_by("sampled_at").first()
    end = earliest.sampled_at if earliest is not None else timezone.now()
    identity = copy.identities[node.pk]
    boot_id = wire.new_nonce()
    count = days * 86_400 // every_s
    stored = 0
    for first in range(0, count, 5_000):
        rows = []
        for seq in range(first + 1, min(first + 5_000, count) + 1):
            at = end - timedelta(seconds=every_s * (count - seq + 1))
            rows.append(_signed_sample_row(node, identity, boot_id, seq, at, ()))
        MeteringSample.objects.bulk_create(rows)
        stored += len(rows)
    return stored


def seed_scaled_market(
    copies: int,
    start: int = 0,
    *,
    shared_users: bool = False,
    history: bool = False,
    sample_every_s: int = 10,
) -> list[Copy]:
    """`copies` copies of the demo market (see seed_copy). With `history`, each also gets a
    buyer's history, another buyer and payouts (seed_history), metering samples of the
    history's nodes every `sample_every_s` seconds (seed_samples; the agent sends one every
    10 s), and every node's reliability score is refreshed, as the beat task keeps them."""
    made = []
    operator = _user_once("scaled-operator") if history else None
    for i in range(start, start + copies):
        copy = seed_copy(i, shared_users=shared_users)
        if history:
            seed_history(copy, i, operator=operator)
            seed_samples(copy, every_s=sample_every_s)
        made.append(copy)
    if history:
        refresh_reliability()
    return made


# --- the pages measured against it (benchmarks/pages.py, tests/db/test_page_queries.py) ---------

MARKETPLACE_FILTERS = {
    "gpu_model": "NVIDIA H100 80GB HBM3",
    "min_vram_gb": "48",
    "max_price": "1.5",
    "max_price_per_gib": "0.008",
    "region": "eu-west",
    "min_reliability": "50",
    "min_gpus": "2",
}
MARKETPLACE_SORTS = ("price", "-price", "-vram", "-free", "-reliability")


def page_paths(copy: Copy) -> dict[str, tuple[str, str]]:
    """Every page of the site, as `name: (who, path)`: who is "anonymous", "buyer" (the copy's
    buyer, whose history seed_history made), "provider" (the copy's first provider) or
    "operator" (staff). The marketplace with no filter, each filter alone, four together, each
    sort and its second page; a listing with a quote; the orders list; an order page and its
    panels in each state the history has; the wallet and its second page; the account pages;
    the public pages; the provider's and the operator's pages."""
    history = copy.history
    running, completed = history["running"][0], history["completed"][0]
    biggest = max(copy.listings, key=lambda listing: listing.gpu_count)
    provider = copy.providers[0]
    node = next(node for node in copy.nodes if node.owner_id == provider.pk)
    own_listing = next(listing for listing in copy.listings if listing.owner_id == provider.pk)
    paths: dict[str, tuple[str, str]] = {
        "/ (anonymous)": ("anonymous", "/"),
        "/listings/<id>/ (anonymous)": ("anonymous", f"/listings/{biggest.pk}/"),
        "/accounts/login/": ("anonymous", "/accounts/login/"),
        "/accounts/signup/": ("anonymous", "/accounts/signup/"),
        "/": ("buyer", "/"),
    }
    for name, value in MARKETPLACE_FILTERS.items():
        paths[f"/?{name}"] = ("buyer", "/?" + urlencode({name: value}))
    four = {"region": "us-east", "min_vram_gb": "40", "max_price": "2", "min_gpus": "1"}
    paths["/?<four filters>"] = ("buyer", "/?" + urlencode(four))
    for sort in MARKETPLACE_SORTS:
        paths[f"/?sort={sort}"] = ("buyer", "/?" + urlencode({"sort": sort}))
    paths["/?page=2"] = ("buyer", "/?page=2")
    quote = urlencode({"hours": 3, "gpu_count": 2})
    paths["/listings/<id>/?hours&gpu_count (quote)"] = ("buyer", f"/listings/{biggest.pk}/?{quote}")
    paths["/orders/"] = ("buyer", "/orders/")
    paths["/orders/?page=2"] = ("buyer", "/orders/?page=2")
    for label, order in [
        ("running, chart", running),
        ("completed, chart + receipt", completed),
        ("disputed", history["disputed"][0]),
        ("resolved", history["resolved"][0]),
        ("stopping", history["stopping"][0]),
        ("provisioning", history["provisioning"][0]),
        ("pending", history["pending"][0]),
        ("cancelled", history["cancelled"][0]),
        ("failed", history["failed"][0]),
    ]:
        paths[f"/orders/<id>/ ({label})"] = ("buyer", f"/orders/{order.pk}/")
    paths["/orders/<id>/panels/ (running)"] = ("buyer", f"/orders/{running.pk}/panels/")
    paths["/orders/<id>/panels/ (completed)"] = ("buyer", f"/orders/{completed.pk}/panels/")
    paths.update(
        {
            "/wallet/": ("buyer", "/wallet/"),
            "/wallet/?page=2": ("buyer", "/wallet/?page=2"),
            "/accounts/tokens/": ("buyer", "/accounts/tokens/"),
            "/accounts/ssh-keys/": ("buyer", "/accounts/ssh-keys/"),
            "/accounts/password/": ("buyer", "/accounts/password/"),
            "/provider/nodes/": ("provider", "/provider/nodes/"),
            "/provider/nodes/cards/": ("provider", "/provider/nodes/cards/"),
            "/provider/nodes/<id>/": ("provider", f"/provider/nodes/{node.pk}/"),
            "/provider/nodes/<id>/card/": ("provider", f"/provider/nodes/{node.pk}/card/"),
            "/provider/listings/": ("provider", "/provider/listings/"),
            "/provider/listings/<id>/": ("provider", f"/provider/listings/{own_listing.pk}/"),
            "/provider/earnings/": ("provider", "/provider/earnings/"),
            "/ops/": ("operator", "/ops/"),
        }
    )
    return paths
