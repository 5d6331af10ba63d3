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
from marketplace.models import ApiToken, Listing, Order, OrderTransition, Settlement
from meshnet import ipplan
from meshnet import services as mesh
from meshnet.errors import MeshError
from meshnet.models import Node

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
    refuses (pool exhausted, key live elsewhere) the order fails and its hold is released."""
    with transaction.atomic():
        order = Order.objects.select_for_update().select_related("listing__node").get(pk=order_id)
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


def stop_order(order: Order, reason: str = "stopped by the buyer") -> Order:
    """Stop an order. Before it runs: cancelled, hold released in full. Running: stopping, the
    peer is dropped from desired state, and settlement follows the agent's removal ack.
    Raises InvalidTransition when the order already ended or is stopping."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order.pk)
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


def billed_seconds(order: Order) -> int:
    """From the agent's ack to the earlier of the stop request and the end of booked time."""
    if order.running_since is None:
        return 0
    end = order.ends_at
    if order.stop_requested_at and (end is None or order.stop_requested_at < end):
        end = order.stop_requested_at
    if end is None:
        end = order.ended_at or timezone.now()
    return max(int((end - order.running_since).total_seconds()), 0)


def settle_order(order: Order) -> Settlement:
    """Capture time + bandwidth (up to the hold), take the fee, pay the provider, release the
    rest; exactly once (unique Settlement.order and hold resolution back this)."""
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
        seconds = billed_seconds(order)
        amounts = billing.settlement_amounts(
            hold=order.hold.amount,
            price_per_gpu_hour=order.price_per_gpu_hour,
            price_per_gib=order.price_per_gib,
            gpu_count=order.gpu_count,
            billed_seconds=seconds,
            total_bytes=order.bytes_in + order.bytes_out,
            fee_bps=settings.MOLT_PLATFORM_FEE_BPS,
        )
        txn = ledger.resolve_hold(
            order.hold,
            captured=amounts.captured,
            fee=amounts.fee,
            provider=order.listing.owner,
            memo=f"settlement of order {order.pk}",
        )
        return Settlement.objects.create(
            order=order,
            transaction=txn,
            billed_seconds=seconds,
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
    deadline = now - timedelta(seconds=settings.MOLT_PROVISIONING_TIMEOUT_SECONDS)
    for order in Order.objects.filter(state=S.PROVISIONING, created_at__lte=deadline).only("pk"):
        with transaction.atomic():
            locked = Order.objects.select_for_update().get(pk=order.pk)
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
