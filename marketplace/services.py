"""Every write path of the market, one transaction each.

Lock order, everywhere: listing row, then (through meshnet) node row and pool row, then
account rows in primary-key order, then the hold row.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from marketplace import billing, ledger
from marketplace.errors import (
    InvalidTransition,
    ListingUnavailable,
    MarketError,
    Oversold,
)
from marketplace.models import (
    Account,
    ApiToken,
    EarningsHold,
    Listing,
    Order,
    OrderTransition,
    Settlement,
)
from meshnet import ipplan
from meshnet import peers as mesh
from meshnet.errors import MeshError
from meshnet.models import JobPeerKey, Node, NodeOutage

log = logging.getLogger(__name__)

API_TOKEN_PREFIX = "molt_"  # noqa: S105  (a prefix, not a secret)
S = Order.State


# --- API tokens ----------------------------------------------------------------------------


def hash_api_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_api_token(user, name: str = "") -> str:
    """A new API token for `user`; the plaintext is returned once and only its hash is kept."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name, token_hash=hash_api_token(token), hint=token[:9])
    return token


# --- listings --------------------------------------------------------------------------------


def create_listing(
    owner,
    *,
    node: Node,
    gpu_count: int,
    price_per_gpu_hour: int,
    price_per_gib: int,
    gpu_model: str | None = None,
    region: str | None = None,
) -> Listing:
    """List `gpu_count` GPUs of one model of `owner`'s node. The model and VRAM come from the
    node's reported GPUs; with several models on the node, `gpu_model` picks one. Locks: node
    row, so two listings cannot together offer more GPUs than the node has."""
    if node.owner_id != owner.pk or node.revoked_at is not None:
        raise MarketError("unknown node", field="node")
    if gpu_count < 1:
        raise MarketError("gpu_count must be at least 1", field="gpu_count")
    if price_per_gpu_hour < 0 or price_per_gib < 0:
        raise MarketError("prices must not be negative", field="price_per_gpu_hour")
    if region and region not in ipplan.REGIONS:
        raise MarketError(
            f"unknown region {region!r}; one of {', '.join(ipplan.REGIONS)}", field="region"
        )
    with transaction.atomic():
        Node.objects.select_for_update().get(pk=node.pk)
        gpus = list(node.gpus.all())
        models = sorted({gpu.name for gpu in gpus})
        if not models:
            raise MarketError(f"{node.name} reports no GPUs", field="node")
        if gpu_model is None:
            if len(models) > 1:
                raise MarketError(
                    f"{node.name} has several GPU models ({', '.join(models)}): choose gpu_model",
                    field="gpu_model",
                )
            gpu_model = models[0]
        matching = [gpu for gpu in gpus if gpu.name == gpu_model]
        if not matching:
            raise MarketError(f"{node.name} has no {gpu_model!r} GPU", field="gpu_model")
        listed = sum(
            Listing.objects.visible()
            .filter(node=node, gpu_model=gpu_model)
            .values_list("gpu_count", flat=True)
        )
        if listed + gpu_count > len(matching):
            raise MarketError(
                f"{node.name} has {len(matching)} {gpu_model} GPU(s), {listed} already listed",
                field="gpu_count",
            )
        return Listing.objects.create(
            owner=owner,
            node=node,
            gpu_model=gpu_model,
            vram_gb=min(gpu.vram_gb for gpu in matching),
            gpu_count=gpu_count,
            price_per_gpu_hour=price_per_gpu_hour,
            price_per_gib=price_per_gib,
            region=region if region is not None else node.region,
            simulated=any(gpu.simulated for gpu in matching),
        )


def update_listing(
    listing: Listing,
    *,
    price_per_gpu_hour: int | None = None,
    price_per_gib: int | None = None,
    gpu_count: int | None = None,
    is_active: bool | None = None,
) -> Listing:
    """Change a listing's prices, GPU count or active flag (False pauses it: no new orders;
    live orders are untouched, and they keep the prices they were placed at).

    A new gpu_count is checked like create_listing's: with the node's other listings of this
    model it must fit the node's GPUs of the model, and it cannot go below the GPUs live orders
    use (Oversold, 409). Locks: listing row, then node row (the store-wide order). A deleted
    listing raises MarketError."""
    if gpu_count is not None and gpu_count < 1:
        raise MarketError("gpu_count must be at least 1", field="gpu_count")
    for name, price in (
        ("price_per_gpu_hour", price_per_gpu_hour),
        ("price_per_gib", price_per_gib),
    ):
        if price is not None and price < 0:
            raise MarketError(f"{name} must not be negative", field=name)
    with transaction.atomic():
        locked = Listing.objects.visible().select_for_update().filter(pk=listing.pk).first()
        if locked is None:
            raise MarketError(f"unknown listing {listing.pk}", field="listing")
        changes: dict[str, object] = {}
        if gpu_count is not None and gpu_count != locked.gpu_count:
            node = Node.objects.select_for_update().get(pk=locked.node_id)
            in_use = Order.objects.gpus_in_use(locked.pk)
            if gpu_count < in_use:
                raise Oversold(f"{in_use} GPUs of this listing are in use by live orders")
            matching = node.gpus.filter(name=locked.gpu_model).count()
            others = sum(
                Listing.objects.visible()
                .filter(node=node, gpu_model=locked.gpu_model)
                .exclude(pk=locked.pk)
                .values_list("gpu_count", flat=True)
            )
            if others + gpu_count > matching:
                raise MarketError(
                    f"{node.name} has {matching} {locked.gpu_model} GPU(s), "
                    f"{others} listed elsewhere",
                    field="gpu_count",
                )
            changes["gpu_count"] = gpu_count
        if price_per_gpu_hour is not None:
            changes["price_per_gpu_hour"] = price_per_gpu_hour
        if price_per_gib is not None:
            changes["price_per_gib"] = price_per_gib
        if is_active is not None:
            changes["is_active"] = is_active
        if changes:
            Listing.objects.filter(pk=locked.pk).update(**changes)
        locked.refresh_from_db()
        return locked


def delete_listing(listing: Listing) -> None:
    """Soft delete: orders keep pointing at the listing they bought from."""
    Listing.objects.filter(pk=listing.pk).update(deleted_at=timezone.now(), is_active=False)


# --- orders ------------------------------------------------------------------------------------


def quote_for(listing: Listing, *, gpu_count: int, hours: int) -> billing.Quote:
    return billing.quote(
        price_per_gpu_hour=listing.price_per_gpu_hour,
        price_per_gib=listing.price_per_gib,
        gpu_count=gpu_count,
        hours=hours,
        allowance_gib=settings.MOLT_BANDWIDTH_ALLOWANCE_GIB,
        fee_bps=settings.MOLT_PLATFORM_FEE_BPS,
    )


def _transition(order: Order, from_state: str, to_state: str, why: str, **fields) -> bool:
    """Compare-and-set the order's state plus a log row saying `why`. False (and nothing
    written) when the order is no longer in `from_state`: someone else won the race. `fields`
    are other Order columns to set (`reason=` among them, so the log reason is not `reason`)."""
    changed = Order.objects.filter(pk=order.pk, state=from_state).update(state=to_state, **fields)
    if not changed:
        return False
    OrderTransition.objects.create(
        order=order, from_state=from_state, to_state=to_state, reason=why
    )
    announce_order(order.pk)
    order.refresh_from_db()
    return True


def place_order(
    buyer, *, listing_id: int, gpu_count: int, hours: int, wireguard_public_key: str
) -> Order:
    """Place an order and its escrow hold in one transaction; enqueue provisioning on commit.

    Locks: the listing row (so concurrent orders cannot oversell it), then the buyer's wallet
    row through the ledger guard. Raises MarketError subclasses naming the bad field; on any
    error nothing is written."""
    if gpu_count < 1:
        raise MarketError("gpu_count must be at least 1", field="gpu_count")
    if not 1 <= hours <= settings.MOLT_MAX_ORDER_HOURS:
        raise MarketError(
            f"hours must be between 1 and {settings.MOLT_MAX_ORDER_HOURS}", field="hours"
        )
    try:
        mesh.validate_peer_key(wireguard_public_key)
    except MeshError as exc:
        raise MarketError(str(exc), field="wireguard_public_key") from None
    with transaction.atomic():
        listing = Listing.objects.available().select_for_update().filter(pk=listing_id).first()
        if listing is None:
            raise MarketError(f"unknown listing {listing_id}", field="listing")
        if listing.owner_id == buyer.pk:
            raise ListingUnavailable("you cannot order your own listing")
        in_use = Order.objects.gpus_in_use(listing.pk)
        if in_use + gpu_count > listing.gpu_count:
            raise Oversold(
                f"only {listing.gpu_count - in_use} of {listing.gpu_count} GPUs "
                "of this listing are free"
            )
        if Order.objects.live().filter(wireguard_public_key=wireguard_public_key).exists():
            raise MarketError(
                "this WireGuard public key is already used by a live order; "
                "generate a new key pair",
                field="wireguard_public_key",
            )
        q = quote_for(listing, gpu_count=gpu_count, hours=hours)
        order = Order.objects.create(
            buyer=buyer,
            listing=listing,
            gpu_count=gpu_count,
            hours=hours,
            wireguard_public_key=wireguard_public_key,
            price_per_gpu_hour=listing.price_per_gpu_hour,
            price_per_gib=listing.price_per_gib,
            bandwidth_allowance_bytes=q.bandwidth_allowance_bytes,
            hold_amount=q.total_hold,
        )
        ledger.place_hold(order, q.total_hold)
        OrderTransition.objects.create(
            order=order, from_state="", to_state=S.PENDING, reason="order placed"
        )
        from marketplace.tasks import provision_order as provision_task

        transaction.on_commit(lambda: provision_task.delay(order.pk))
    return order


def provision_order(order_id: int) -> Order:
    """Allocate the job's MOLT address and desired peer on the provider node; pending ->
    provisioning. Idempotent: an order no longer pending is returned unchanged. If the mesh
    refuses (pool exhausted, key live elsewhere) the order fails and its hold is released.
    Locks: the node row, the order row (as stop_order: a buyer cancelling while the worker
    provisions waits instead of deadlocking), then the pool row."""
    with transaction.atomic():
        order = _lock_node_then_order(order_id)
        if order.state != S.PENDING:
            return order
        try:
            with transaction.atomic():
                peer = mesh.create_job_peer(
                    order.listing.node, order.wireguard_public_key, ref=f"order:{order.pk}"
                )
        except MeshError as exc:
            _release_and_end(order, S.PENDING, S.FAILED, f"provisioning failed: {exc}")
            return order
        _transition(order, S.PENDING, S.PROVISIONING, "job address allocated", job_peer=peer)
        return order


def mark_running(order: Order, at: datetime) -> bool:
    """The agent acknowledged the job's peer: billing starts now. provisioning -> running."""
    return _transition(
        order,
        S.PROVISIONING,
        S.RUNNING,
        "agent acknowledged the peer",
        running_since=at,
        ends_at=at + timedelta(hours=order.hours),
    )


def _release_and_end(order: Order, from_state: str, to_state: str, reason: str) -> bool:
    if not _transition(order, from_state, to_state, reason, ended_at=timezone.now(), reason=reason):
        return False
    ledger.resolve_hold(order.hold, captured=0, fee=0, provider=None, memo=f"{to_state}: {reason}")
    if order.job_peer_id:
        mesh.remove_job_peer(f"order:{order.pk}")
    return True


def _lock_node_then_order(order_pk: int) -> Order:
    """Lock the order's provider node row, then the order's, and return the order. Every path
    that changes an order together with its peer takes them in this order, as an agent's ack
    does (the node, then the orders of its peers), so they wait for each other instead of
    deadlocking. Call inside a transaction."""
    node_id = Listing.objects.filter(orders=order_pk).values_list("node_id", flat=True).get()
    Node.objects.select_for_update().filter(pk=node_id).first()
    return Order.objects.select_for_update().get(pk=order_pk)


def stop_order(order: Order, reason: str = "stopped by the buyer") -> Order:
    """Stop an order. Before it runs: cancelled, hold released in full. Running: stopping, the
    peer is dropped from desired state, and settlement follows the agent's removal ack.
    Raises InvalidTransition when the order already ended or is stopping.

    Locks: the provider node's row, then the order's: the same order as an agent's ack (node,
    then the orders its peers belong to), so a stop racing an ack waits instead of deadlocking.
    """
    with transaction.atomic():
        order = _lock_node_then_order(order.pk)
        now = timezone.now()
        if order.state in (S.PENDING, S.PROVISIONING):
            _release_and_end(order, order.state, S.CANCELLED, reason)
        elif order.state == S.RUNNING:
            _transition(order, S.RUNNING, S.STOPPING, reason, stop_requested_at=now, reason=reason)
            mesh.remove_job_peer(f"order:{order.pk}")
        else:
            raise InvalidTransition(f"order {order.pk} is already {order.state}")
        return order


def complete_order(order: Order, at: datetime) -> bool:
    """The agent acknowledged the peer's removal: stopping -> completed, then settle."""
    with transaction.atomic():
        if not _transition(order, S.STOPPING, S.COMPLETED, "agent removed the peer", ended_at=at):
            return False
        settle_order(order)
        return True


def billing_span(order: Order, cut_at: datetime | None = None) -> tuple[datetime, datetime] | None:
    """What an order is billed for: from the agent's ack to the earliest of the stop request,
    the end of booked time and `cut_at` (the last heartbeat of a node that was lost). None when
    it never ran."""
    if order.running_since is None:
        return None
    ends = [t for t in (order.ends_at, order.stop_requested_at, cut_at) if t is not None]
    end = min(ends) if ends else (order.ended_at or timezone.now())
    return order.running_since, max(end, order.running_since)


def charged_seconds(order: Order, cut_at: datetime | None = None) -> tuple[int, int]:
    """(charged, offline) whole seconds of the billing span: the provider node's recorded
    outages (NodeOutage) inside it are not charged (see billing.charged_seconds)."""
    span = billing_span(order, cut_at)
    if span is None:
        return 0, 0
    start, end = span
    outages = NodeOutage.objects.filter(
        node_id=order.listing.node_id, started_at__lt=end, ended_at__gt=start
    ).values_list("started_at", "ended_at")
    return billing.charged_seconds(start, end, list(outages))


def billed_seconds(order: Order) -> int:
    """The seconds an order is charged for: its billing span less its node's outages."""
    return charged_seconds(order)[0]


def settle_order(order: Order, *, cut_at: datetime | None = None) -> Settlement:
    """Capture time + bandwidth (up to the hold), take the fee, release the rest; exactly once
    (unique Settlement.order and hold resolution back this). The provider's share goes into a
    frozen account of this order (an EarningsHold) until the dispute window passes: see
    marketplace.payments. `cut_at` ends the billing span early (a lost node's last heartbeat).

    Locks: the order row, then the hold row and accounts."""
    with transaction.atomic():
        order = (
            Order.objects.select_for_update(of=("self",))
            .select_related("listing", "hold")
            .get(pk=order.pk)
        )
        existing = Settlement.objects.filter(order=order).first()
        if existing is not None:
            return existing
        if order.state not in Order.ENDED_STATES:
            # Settling a live order would bill it so far and release the rest while it runs.
            raise InvalidTransition(f"order {order.pk} is {order.state}: only ended orders settle")
        seconds, offline = charged_seconds(order, cut_at)
        amounts = billing.settlement_amounts(
            hold=order.hold.amount,
            price_per_gpu_hour=order.price_per_gpu_hour,
            price_per_gib=order.price_per_gib,
            gpu_count=order.gpu_count,
            billed_seconds=seconds,
            total_bytes=order.bytes_in + order.bytes_out,
            fee_bps=settings.MOLT_PLATFORM_FEE_BPS,
        )
        frozen = None
        if amounts.captured:
            frozen = Account.objects.create(kind=Account.Kind.FROZEN, user=order.listing.owner)
        txn = ledger.resolve_hold(
            order.hold,
            captured=amounts.captured,
            fee=amounts.fee,
            provider=order.listing.owner,
            memo=f"settlement of order {order.pk}",
            earnings=frozen,
        )
        if frozen is not None:
            window = timedelta(seconds=settings.MOLT_DISPUTE_WINDOW_SECONDS)
            EarningsHold.objects.create(
                order=order,
                provider=order.listing.owner,
                account=frozen,
                amount=amounts.provider_amount,
                release_after=timezone.now() + window,
            )
        return Settlement.objects.create(
            order=order,
            transaction=txn,
            billed_seconds=seconds,
            offline_seconds=offline,
            time_charge=amounts.time_charge,
            bandwidth_bytes=order.bytes_in + order.bytes_out,
            bandwidth_charge=amounts.bandwidth_charge,
            captured=amounts.captured,
            fee=amounts.fee,
            provider_amount=amounts.provider_amount,
            released=amounts.released,
        )


def expire_orders(now: datetime | None = None) -> int:
    """Stop running orders whose booked time is up, and fail orders stuck provisioning past the
    timeout (hold released in full). Returns how many orders changed."""
    now = now or timezone.now()
    changed = 0
    for order in Order.objects.filter(state=S.RUNNING, ends_at__lte=now).only("pk"):
        try:
            stop_order(order, reason="booked time is up")
            changed += 1
        except InvalidTransition:
            pass  # stopped by someone else meanwhile
    changed += end_orders_of_lost_nodes(now)
    deadline = now - timedelta(seconds=settings.MOLT_PROVISIONING_TIMEOUT_SECONDS)
    for order in Order.objects.filter(state=S.PROVISIONING, created_at__lte=deadline).only("pk"):
        with transaction.atomic():
            locked = _lock_node_then_order(order.pk)
            if locked.state == S.PROVISIONING and _release_and_end(
                locked, S.PROVISIONING, S.FAILED, "the provider node did not acknowledge in time"
            ):
                changed += 1
    return changed


def add_traffic(job_peer, *, rx_bytes: int, tx_bytes: int) -> None:
    """Add metered bytes to the job's order. rx is what the provider received from the buyer
    (the buyer's bytes_out), tx what it sent (the buyer's bytes_in). Atomic increments, so
    concurrent samples never lose an update."""
    from django.db.models import F

    Order.objects.filter(job_peer=job_peer).update(
        bytes_in=F("bytes_in") + tx_bytes, bytes_out=F("bytes_out") + rx_bytes
    )


# --- the bandwidth allowance and lost provider nodes -------------------------------------------

BANDWIDTH_USED_UP = "bandwidth allowance used up"


def stop_if_allowance_used(job_peer) -> bool:
    """Stop the job's running order once its metered bytes reach the bandwidth allowance its
    hold covers, with the reason BANDWIDTH_USED_UP. True when this call stopped it. Runs in the
    metering transaction, after add_traffic; locks as stop_order."""
    order = Order.objects.filter(job_peer=job_peer, state=S.RUNNING).first()
    if order is None or order.bytes_in + order.bytes_out < order.bandwidth_allowance_bytes:
        return False
    try:
        stopped = stop_order(order, reason=BANDWIDTH_USED_UP)
    except InvalidTransition:
        return False  # stopped meanwhile
    return stopped.state == S.STOPPING


def end_orders_of_lost_nodes(now: datetime | None = None) -> int:
    """End the orders of provider nodes silent for MOLT_NODE_FAILURE_GRACE_SECONDS: running
    ones fail, stopping ones complete (no agent will acknowledge the removal). Each is settled
    at once, billed up to the node's last heartbeat (less earlier outages), the rest of the hold
    released, and its peer dropped from desired state. Returns how many ended.

    One transaction per order, in id order. Locks: the node row, the order row, then the hold
    and accounts."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.MOLT_NODE_FAILURE_GRACE_SECONDS)
    candidates = (
        Order.objects.filter(
            state__in=(S.RUNNING, S.STOPPING), listing__node__last_seen_at__lt=cutoff
        )
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    ended = 0
    for order_id in list(candidates):
        with transaction.atomic():
            order = _lock_node_then_order(order_id)
            last_seen = Node.objects.values_list("last_seen_at", flat=True).get(
                pk=order.listing.node_id
            )
            if order.state not in (S.RUNNING, S.STOPPING) or not last_seen or last_seen >= cutoff:
                continue  # it came back, or the order moved on meanwhile
            why = f"provider node offline since {last_seen:%Y-%m-%d %H:%M:%S} UTC"
            if order.state == S.RUNNING:
                moved = _transition(order, S.RUNNING, S.FAILED, why, ended_at=now, reason=why)
            else:
                moved = _transition(order, S.STOPPING, S.COMPLETED, why, ended_at=now)
            if not moved:
                continue
            settle_order(order, cut_at=last_seen)
            mesh.remove_job_peer(f"order:{order.pk}")
            ended += 1
    return ended


# --- re-keying and live order pages ------------------------------------------------------------


def rekey_order(order: Order, wireguard_public_key: str) -> Order:
    """Give a live order a new WireGuard public key: the buyer lost the private key of the old
    one. Before provisioning only the order changes; after it, the job peer keeps its address and
    gets the new key in a new desired revision (meshnet.peers.replace_peer_key), so the
    agent's reconcile drops the old key's peer and adds the new one. Sending the key the order
    already has is a no-op (a retried request).

    Locks: the provider node's row, the job peer's key rows, then the order's: the order
    everything else takes them in. An agent's ack locks the node, then keys, then orders; a
    metering sample locks keys, then the order; stop_order the node, then the order. Taking
    the order first here deadlocked with a sample of the same order arriving meanwhile.
    Raises MarketError naming wireguard_public_key (invalid, or live on another order or peer)
    and InvalidTransition when the order is stopping or ended."""
    try:
        mesh.validate_peer_key(wireguard_public_key)
    except MeshError as exc:
        raise MarketError(str(exc), field="wireguard_public_key") from None
    with transaction.atomic():
        node_id, job_peer_id = (
            Order.objects.filter(pk=order.pk).values_list("listing__node_id", "job_peer_id").get()
        )
        Node.objects.select_for_update().filter(pk=node_id).first()
        if job_peer_id is not None:
            list(
                JobPeerKey.objects.select_for_update()
                .filter(job_peer_id=job_peer_id)
                .order_by("pk")
            )
        order = Order.objects.select_for_update().get(pk=order.pk)
        if order.wireguard_public_key == wireguard_public_key:
            return order
        if order.state not in (S.PENDING, S.PROVISIONING, S.RUNNING):
            raise InvalidTransition(f"order {order.pk} is {order.state}: it cannot be re-keyed")
        if (
            Order.objects.live()
            .filter(wireguard_public_key=wireguard_public_key)
            .exclude(pk=order.pk)
            .exists()
        ):
            raise MarketError(
                "this WireGuard public key is already used by a live order; "
                "generate a new key pair",
                field="wireguard_public_key",
            )
        Order.objects.filter(pk=order.pk).update(wireguard_public_key=wireguard_public_key)
        if order.job_peer_id is not None:
            try:
                mesh.replace_peer_key(f"order:{order.pk}", wireguard_public_key)
            except MeshError as exc:
                raise MarketError(str(exc), field="wireguard_public_key") from None
        announce_order(order.pk)
        order.refresh_from_db()
        return order


def order_group(order_id: int) -> str:
    """The Channels group the order's browser pages join (frontend.consumers.OrderConsumer)."""
    return f"order.{order_id}"


def announce_order(order_id: int) -> None:
    """After commit, tell the order's open pages that it changed. The message carries only the
    id: each page's consumer re-reads the order and re-checks its owner before sending anything.
    At most once (the channel layer may drop it); a page that reconnects gets the full state."""

    def send() -> None:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(
                order_group(order_id), {"type": "order.changed", "order": order_id}
            )
        except Exception:
            # A page that misses this still shows the truth on its next reconnect or reload;
            # the transition that already committed must not look failed to its caller.
            log.warning("could not announce order %s to its pages", order_id, exc_info=True)

    transaction.on_commit(send, robust=True)


def revoke_api_token(user, token_id: int) -> bool:
    """Delete one of `user`'s API tokens; requests bearing it fail from now on. False when
    `user` has no such token (another user's token id reads as unknown)."""
    deleted, _ = ApiToken.objects.filter(pk=token_id, user=user).delete()
    return bool(deleted)


def fail_order(order: Order, reason: str) -> bool:
    """End a live order as failed with its hold released in full, whatever state it reached:
    the provider side can no longer be trusted (its node was revoked), so nothing it ran is
    billed. The job peer, if any, is dropped from desired state. False (and nothing written)
    when the order had already ended.

    Locks: the node row, the order row, then the hold and accounts: the same order as
    stop_order."""
    with transaction.atomic():
        locked = _lock_node_then_order(order.pk)
        if locked.state not in Order.LIVE_STATES:
            return False
        return _release_and_end(locked, locked.state, S.FAILED, reason)
