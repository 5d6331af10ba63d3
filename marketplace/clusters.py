"""Multi-node orders (issue 16): one job on GPUs of several listings, so several nodes,
possibly of several providers and regions.

Shape. A Cluster is the parent; each part is an ordinary Order on one listing (Order.cluster,
Order.part_index) with its own job peer and sandbox on its node, so every part runs the single-
node lifecycle of marketplace.orders unchanged: provisioned by its own task, running (and
billed) from the moment its own peer and sandbox are ready, stopped, settled, disputed on its
own. What the cluster adds:

- one POST, one transaction: the cluster, its parts and ONE escrow hold for the total (the
  wallet's guard checks the funds once; marketplace.cluster_ledger);
- a state derived from the parts (marketplace.cluster_state): `running` when every part is;
- stop ends every part, in one transaction (stop_cluster);
- a part that fails (its node lost past the grace, its sandbox dead, never provisioned) ends
  the whole job when the buyer chose on_part_loss="end", or leaves the others running and
  billing under "degrade";
- cluster_members(): the hook the mesh code uses to peer the parts' nodes.

Lock order, as marketplace.orders: node rows (in primary-key order when several), then order
rows (primary-key order), then the Cluster row, then the hold row and accounts. place_cluster
has no node yet: it locks the listing rows in primary-key order, then the wallet.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from marketplace import cluster_ledger, cluster_state, lifecycle
from marketplace.cluster_models import Cluster
from marketplace.errors import InvalidTransition, ListingUnavailable, MarketError, Oversold
from marketplace.models import Listing, Order
from marketplace.orders import (
    _sandbox_terms,
    cluster_key_group,
    quote_for,
    refuse_key_live_elsewhere,
    stop_locked,
)
from marketplace.signals import order_changed, order_placed
from meshnet.errors import MeshError
from meshnet.models import JobPeer, Node, Sandbox
from meshnet.peers import replace_group_key, validate_peer_key

S = Order.State

# At most this many parts (nodes) per order. Why 16: each part is a node, and the mesh's full
# mesh among a job's nodes costs n(n-1)/2 tunnels (120 at 16; issue 16's topology work decides
# hubs beyond a measured size); placing the order locks every part's listing row in one
# transaction, which should stay short; and 16 nodes of 8 GPUs is 128 GPUs, past what the
# market's largest listings offer today. Raise it with the mesh's measured limit.
MAX_PARTS = 16


@dataclass(frozen=True)
class PartSpec:
    """One part as the buyer asks for it. The WireGuard key is the cluster's, not the part's:
    every part's node gets the buyer's one key as its job peer (meshnet.key_claims), so one
    wg-quick file reaches every sandbox of the order (marketplace.cluster_tunnel)."""

    listing: int
    gpu_count: int
    image: str | None = None


def _field(index: int, name: str) -> str:
    return f"parts[{index}].{name}"


def _check_specs(
    specs: list[PartSpec], hours: int, on_part_loss: str, wireguard_public_key: str
) -> None:
    """Everything that needs no database; MarketError naming the field."""
    if not 1 <= len(specs) <= MAX_PARTS:
        raise MarketError(f"an order takes between 1 and {MAX_PARTS} parts", field="parts")
    if not 1 <= hours <= settings.MOLT_MAX_ORDER_HOURS:
        raise MarketError(
            f"hours must be between 1 and {settings.MOLT_MAX_ORDER_HOURS}", field="hours"
        )
    if on_part_loss not in Cluster.OnPartLoss.values:
        raise MarketError('on_part_loss must be "end" or "degrade"', field="on_part_loss")
    try:
        validate_peer_key(wireguard_public_key)
    except MeshError as exc:
        raise MarketError(str(exc), field="wireguard_public_key") from None
    listings: dict[int, int] = {}
    for i, spec in enumerate(specs):
        if spec.gpu_count < 1:
            raise MarketError("gpu_count must be at least 1", field=_field(i, "gpu_count"))
        if spec.listing in listings:
            raise MarketError(
                f"listing {spec.listing} is already part {listings[spec.listing]}: "
                "take more of its GPUs in that part instead",
                field=_field(i, "listing"),
            )
        listings[spec.listing] = i


def place_cluster(
    buyer, *, parts: list[PartSpec], hours: int, on_part_loss: str, wireguard_public_key: str
) -> Cluster:
    """Place a multi-node order: the cluster, one pending Order per part and one escrow hold
    for the total of the parts' quotes, in one transaction; then `order_placed` per part (its
    receiver enqueues that part's provisioning on commit). Listings of any region and any
    provider may be combined; the buyer's own listing is refused, as for a single order.

    Locks: the parts' listing rows in primary-key order (so two orders sharing listings cannot
    deadlock, nor oversell one), then the buyer's wallet row through the ledger guard. Raises
    MarketError subclasses naming the field (`parts[i].listing` and so on,
    `wireguard_public_key` for a key live on another order; InsufficientFunds for the total);
    on any error nothing is written. The key's one-group rule is the database's when the parts
    are provisioned (meshnet.key_claims); the check here gives the usual case its 400."""
    _check_specs(parts, hours, on_part_loss, wireguard_public_key)
    with transaction.atomic():
        ids = sorted(spec.listing for spec in parts)
        locked = {
            listing.pk: listing
            for listing in Listing.objects.available()
            .select_for_update()
            .filter(pk__in=ids)
            .order_by("pk")
        }
        terms = []
        for i, spec in enumerate(parts):
            listing = locked.get(spec.listing)
            if listing is None:
                raise MarketError(f"unknown listing {spec.listing}", field=_field(i, "listing"))
            if listing.owner_id == buyer.pk:
                raise ListingUnavailable(
                    "you cannot order your own listing", field=_field(i, "listing")
                )
            in_use = Order.objects.gpus_in_use(listing.pk)
            if in_use + spec.gpu_count > listing.gpu_count:
                raise Oversold(
                    f"only {listing.gpu_count - in_use} of {listing.gpu_count} GPUs "
                    f"of listing {listing.pk} are free",
                    field=_field(i, "gpu_count"),
                )
            try:
                image, ssh_keys = _sandbox_terms(buyer, listing, spec.image)
            except MarketError as exc:
                field = exc.field if exc.field == "ssh_keys" else _field(i, "image")
                raise MarketError(str(exc), field=field) from None
            quote = quote_for(listing, gpu_count=spec.gpu_count, hours=hours)
            terms.append((spec, listing, image, ssh_keys, quote))
        refuse_key_live_elsewhere(wireguard_public_key)
        total = sum(quote.total_hold for *_, quote in terms)
        cluster = Cluster.objects.create(
            buyer=buyer,
            hours=hours,
            on_part_loss=on_part_loss,
            hold_amount=total,
            wireguard_public_key=wireguard_public_key,
        )
        created = []
        for i, (spec, listing, image, ssh_keys, quote) in enumerate(terms):
            created.append(
                Order.objects.create(
                    buyer=buyer,
                    listing=listing,
                    gpu_count=spec.gpu_count,
                    hours=hours,
                    wireguard_public_key=wireguard_public_key,
                    price_per_gpu_hour=listing.price_per_gpu_hour,
                    price_per_gib=listing.price_per_gib,
                    bandwidth_allowance_bytes=quote.bandwidth_allowance_bytes,
                    hold_amount=quote.total_hold,
                    image=image,
                    ssh_keys=ssh_keys,
                    cluster=cluster,
                    part_index=i,
                )
            )
        cluster_ledger.place_cluster_hold(cluster, total)
        for order in created:
            lifecycle.record_placed(order)
            order_placed.send(sender=Order, order=order)
    return cluster


def parts_of(cluster: Cluster) -> list[Order]:
    return list(Order.objects.filter(cluster=cluster).order_by("part_index"))


def state_of(cluster: Cluster, parts: list[Order] | None = None) -> str:
    """The cluster's state, derived from its parts' (marketplace.cluster_state)."""
    parts = parts if parts is not None else parts_of(cluster)
    return cluster_state.derive(
        [p.state for p in parts], ended_by_loss=cluster.ended_by_loss_at is not None
    )


def _stop_parts(cluster_id: int, reason: str) -> int:
    """Stop every live part of the cluster in the caller's transaction: the parts' node rows in
    primary-key order, then their order rows, then each part as stop_order would. Returns how
    many parts this call moved."""
    node_ids = sorted(
        set(Order.objects.filter(cluster_id=cluster_id).values_list("listing__node_id", flat=True))
    )
    list(Node.objects.select_for_update().filter(pk__in=node_ids).order_by("pk"))
    parts = list(Order.objects.select_for_update().filter(cluster_id=cluster_id).order_by("pk"))
    return sum(stop_locked(part, reason) for part in parts)


def stop_cluster(cluster: Cluster, reason: str = "stopped by the buyer") -> Cluster:
    """Stop every part in one transaction: parts not yet running are cancelled (nothing of
    their share captured), running ones go stopping and settle when their node drops them; the
    hold's rest is released when the last part has ended. Raises InvalidTransition when no part
    was left to stop (every one stopping or ended)."""
    with transaction.atomic():
        if not _stop_parts(cluster.pk, reason):
            raise InvalidTransition(f"multi-node order {cluster.pk} is already {state_of(cluster)}")
    cluster.refresh_from_db()
    return cluster


def rekey_cluster(cluster: Cluster, wireguard_public_key: str) -> Cluster:
    """Give a live multi-node order a new WireGuard public key (the buyer lost the private key
    of the old one): the cluster and every live part take it, and the parts' peers get it on
    every node at once, keeping the one tunnel address (meshnet.peers.replace_group_key), so the
    buyer's one wg-quick file needs only the new private key. A part not yet provisioned gets the
    new key when it is. Sending the key the cluster already has is a no-op (a retried request).

    Locks: the parts' node rows (primary-key order), the parts' order rows, then the cluster
    row, as _stop_parts. Raises MarketError naming wireguard_public_key (invalid, live on
    another order or peer, or a cluster placed with a key per part) and InvalidTransition when
    no part is live."""
    try:
        validate_peer_key(wireguard_public_key)
    except MeshError as exc:
        raise MarketError(str(exc), field="wireguard_public_key") from None
    with transaction.atomic():
        node_ids = sorted(
            set(
                Order.objects.filter(cluster_id=cluster.pk).values_list(
                    "listing__node_id", flat=True
                )
            )
        )
        list(Node.objects.select_for_update().filter(pk__in=node_ids).order_by("pk"))
        parts = list(Order.objects.select_for_update().filter(cluster_id=cluster.pk).order_by("pk"))
        cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
        live = [p for p in parts if p.state in (S.PENDING, S.PROVISIONING, S.RUNNING)]
        if not live:
            raise InvalidTransition(
                f"multi-node order {cluster.pk} is {state_of(cluster, parts)}: it cannot be "
                "re-keyed"
            )
        if cluster.wireguard_public_key == wireguard_public_key and all(
            p.wireguard_public_key == wireguard_public_key for p in live
        ):
            return cluster
        if any(p.wireguard_public_key != cluster.wireguard_public_key for p in parts):
            raise MarketError(
                f"multi-node order {cluster.pk} was placed with a key per part; it cannot "
                "take one key now",
                field="wireguard_public_key",
            )
        refuse_key_live_elsewhere(wireguard_public_key, Q(cluster_id=cluster.pk))
        Cluster.objects.filter(pk=cluster.pk).update(wireguard_public_key=wireguard_public_key)
        Order.objects.filter(pk__in=[p.pk for p in live]).update(
            wireguard_public_key=wireguard_public_key
        )
        if any(p.job_peer_id is not None for p in live):
            try:
                replace_group_key(cluster_key_group(cluster.pk), wireguard_public_key)
            except MeshError as exc:
                raise MarketError(str(exc), field="wireguard_public_key") from None
        for part in live:
            order_changed.send(sender=Order, order_id=part.pk)
    cluster.refresh_from_db()
    return cluster


def end_after_loss(cluster_id: int) -> int:
    """A part failed under on_part_loss="end" (cluster_ledger.part_ended marked it): stop the
    others. Idempotent (a part already stopping or ended is left as it is); called after the
    marking commits (marketplace.receivers) and by the expire-orders sweep in case that was
    lost. Returns how many parts it moved."""
    with transaction.atomic():
        cluster = Cluster.objects.filter(pk=cluster_id, ended_by_loss_at__isnull=False).first()
        if cluster is None:
            return 0
        return _stop_parts(cluster_id, f"multi-node order ended: {cluster.reason}"[:200])


def sweep_lost_clusters() -> int:
    """end_after_loss for every cluster ended by a loss that still has parts running or not yet
    started (its after-commit call lost to a crash)."""
    ids = (
        Cluster.objects.filter(
            ended_by_loss_at__isnull=False,
            parts__state__in=(S.PENDING, S.PROVISIONING, S.RUNNING),
        )
        .values_list("pk", flat=True)
        .distinct()
    )
    return sum(end_after_loss(pk) for pk in list(ids))


@dataclass(frozen=True, order=True)
class Member:
    """One sandbox of a multi-node order on the mesh: the part, its node and the address its
    sandbox has (the job peer's address for a part without a sandbox)."""

    part_index: int
    node_id: int
    node_name: str
    address: str


def cluster_members(cluster_id: int) -> frozenset[Member]:
    """The hook for the mesh's node-to-node peers and names (issue 16): the (node, sandbox
    address) members of a multi-node order, for every part that is provisioning or running and
    has its address already (the parts whose nodes must reach each other now). A part that ended
    (or is stopping) is no member: its node's peers to the others are to be removed. Reads
    only; two queries."""
    parts = list(
        Order.objects.filter(cluster_id=cluster_id, state__in=(S.PROVISIONING, S.RUNNING))
        .exclude(job_peer__isnull=True)
        .values_list("pk", "part_index", "job_peer_id")
    )
    peers = {
        p.pk: p
        for p in JobPeer.objects.filter(pk__in=[peer for *_, peer in parts]).select_related("node")
    }
    sandboxes = dict(
        Sandbox.objects.filter(ref__in=[f"order:{pk}" for pk, *_ in parts]).values_list(
            "ref", "address"
        )
    )
    members = set()
    for pk, index, peer_id in parts:
        peer = peers[peer_id]
        address = sandboxes.get(f"order:{pk}", peer.address)
        members.add(Member(index, peer.node_id, peer.node.name, str(address)))
    return frozenset(members)
