"""The demo market, N times over, with orders in every state: the data the ops dashboard's
query-count test and benchmarks/pages.py measure the pages against. Everything goes through
the real services (signed enrolment, listings, orders with holds, acknowledgements, traffic,
settlement), so the rows are the ones a running gateway would have."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.utils import timezone

from marketplace import ledger
from marketplace import services as market
from marketplace.management.commands.seed_demo import PROVIDERS, _enrol
from marketplace.models import Listing, Order
from meshnet import services as mesh
from meshnet.models import JobPeer, Node
from tests.factories import wg_public_key

USD = 1_000_000
PASSWORD = make_password("scaled-market-pass")  # hashed once: hashing per user is the slow part


@dataclass
class Copy:
    providers: list = field(default_factory=list)
    buyer: object = None
    nodes: list[Node] = field(default_factory=list)
    listings: list[Listing] = field(default_factory=list)
    orders: dict[str, list[Order]] = field(default_factory=dict)


def _user(username: str):
    return get_user_model().objects.create(username=username, password=PASSWORD)


def _ack(node: Node, at=None) -> None:
    node.refresh_from_db()
    mesh.acknowledge_revision(node, node.desired_revision, at=at)


def _order(buyer, listing: Listing) -> Order:
    return market.place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=2, wireguard_public_key=wg_public_key()
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
            node = _enrol(provider, demo_node)
            copy.nodes.append(node)
            for demo_listing in demo_node.listings:
                copy.listings.append(
                    market.create_listing(
                        provider,
                        node=node,
                        gpu_model=demo_node.gpu[0],
                        gpu_count=demo_listing.gpu_count,
                        price_per_gpu_hour=demo_listing.price_per_gpu_hour,
                        price_per_gib=demo_listing.price_per_gib,
                    )
                )
    for node in copy.nodes[::2]:
        mesh.record_heartbeat(node, node.observed_ip)
    mesh.record_report(copy.nodes[-1], "desired state refused: bad signature (scaled market)")

    copy.buyer = make(name("buyer"))
    ledger.grant_credits(copy.buyer, 5_000 * USD, memo=f"scaled market {index}")
    biggest = max(copy.listings, key=lambda listing: listing.gpu_count)
    node = biggest.node
    orders: dict[str, list[Order]] = {state: [] for state in Order.State.values}
    for _ in range(2):
        order = _order(copy.buyer, biggest)
        market.provision_order(order.pk)
        _ack(node, at=timezone.now() - timedelta(minutes=40))
        peer = JobPeer.objects.get(ref=f"order:{order.pk}")
        market.add_traffic(peer, rx_bytes=300 * 2**20, tx_bytes=2 * 2**30)
        market.stop_order(Order.objects.get(pk=order.pk))
        _ack(node)
        orders["completed"].append(Order.objects.get(pk=order.pk))
    failed = _order(copy.buyer, biggest)
    market.provision_order(failed.pk)
    market.fail_order(failed, "the provider node did not acknowledge in time")
    orders["failed"].append(failed)
    cancelled = _order(copy.buyer, biggest)
    market.stop_order(cancelled, reason="changed my mind")
    orders["cancelled"].append(cancelled)
    running = _order(copy.buyer, biggest)
    market.provision_order(running.pk)
    _ack(node)
    orders["running"].append(running)
    orders["pending"].append(_order(copy.buyer, biggest))
    copy.orders = orders
    return copy


def seed_scaled_market(copies: int, start: int = 0, *, shared_users: bool = False) -> list[Copy]:
    return [seed_copy(i, shared_users=shared_users) for i in range(start, start + copies)]
