"""An order's life: placing it with its escrow hold, provisioning, running, stopping, ending,
re-keying, and the sweeps that end what timed out or lost its node. One transaction each; every
state change goes through marketplace.lifecycle.transition.

Lock order, everywhere: the provider node row, then the job peer's key rows, then the order row,
then (for a part of a multi-node order) its Cluster row, then the hold row and accounts in
primary-key order (tests/db/test_concurrency_pg.py and test_clusters_pg.py prove it).
place_order is the one path with no node yet: it locks the listing row, then the wallet.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from marketplace import billing, cluster_ledger, ledger, lifecycle
from marketplace.errors import InvalidTransition, ListingUnavailable, MarketError, Oversold
from marketplace.models import Listing, Order, SshKey
from marketplace.settlement import settle_order
from marketplace.signals import order_changed, order_placed
from meshnet.errors import MeshError, NotEnoughGpus
from meshnet.mesh import cluster_group
from meshnet.models import JobPeer, JobPeerKey, Node, Sandbox
from meshnet.peers import create_job_peer, remove_job_peer, replace_peer_key, validate_peer_key
from meshnet.sandboxes import SandboxRequest

S = Order.State


def quote_for(listing: Listing, *, gpu_count: int, hours: int) -> billing.Quote:
    return billing.quote(
        price_per_gpu_hour=listing.price_per_gpu_hour,
        price_per_gib=listing.price_per_gib,
        gpu_count=gpu_count,
        hours=hours,
        allowance_gib=settings.MOLT_BANDWIDTH_ALLOWANCE_GIB,
        fee_bps=settings.MOLT_PLATFORM_FEE_BPS,
    )


def place_order(
    buyer,
    *,
    listing_id: int,
    gpu_count: int,
    hours: int,
    wireguard_public_key: str,
    image: str | None = None,
) -> Order:
    """Place an order and its escrow hold in one transaction, and send `order_placed` (its
    receiver enqueues provisioning on commit: see marketplace.signals).

    A listing with images is a sandbox listing: the order runs `image` (one of them; default
    the first) in a sandbox that takes the buyer's SSH keys, both snapshotted on the order now
    (a key added or deleted later changes no placed order); a buyer with no key is refused. A
    listing without images gives a tunnel to the node only (the way before sandboxes; to go).

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
        validate_peer_key(wireguard_public_key)
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
        refuse_key_live_elsewhere(wireguard_public_key)
        chosen_image, ssh_keys = _sandbox_terms(buyer, listing, image)
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
            image=chosen_image,
            ssh_keys=ssh_keys,
        )
        ledger.place_hold(order, q.total_hold)
        lifecycle.record_placed(order)
        order_placed.send(sender=Order, order=order)
    return order


NO_SSH_KEY = (
    "add an SSH public key to your account before ordering (the SSH keys page under your "
    "account menu, or POST /api/v1/ssh-keys/): the sandbox lets in only your keys"
)


def _sandbox_terms(buyer, listing: Listing, image: str | None) -> tuple[str, list[str]]:
    """The image and SSH key lines an order on `listing` snapshots: ("", []) on a listing
    without images. MarketError naming `image` (not one the listing offers) or `ssh_keys` (the
    buyer has none)."""
    offered = list(listing.images or [])
    if not offered:
        if image:
            raise MarketError("this listing runs no images: leave image out", field="image")
        return "", []
    if image and image not in offered:
        raise MarketError(
            f"image must be one of this listing's images: {', '.join(offered)}", field="image"
        )
    keys = list(SshKey.objects.filter(user=buyer).values_list("public_key", flat=True))
    if not keys:
        raise MarketError(NO_SSH_KEY, field="ssh_keys")
    return image or offered[0], keys


def sandbox_request(order: Order) -> SandboxRequest | None:
    """What the order's sandbox gets, from the listing's per-GPU terms and the order's
    snapshot; None for an order without an image (a tunnel-only listing's)."""
    if not order.image:
        return None
    listing = order.listing
    return SandboxRequest(
        image=order.image,
        gpu_count=order.gpu_count,
        cpus_milli=listing.cpus_per_gpu * 1000 * order.gpu_count,
        memory_mb=listing.memory_gb_per_gpu * 1024 * order.gpu_count,
        disk_gb=listing.disk_gb,
        egress=listing.egress,
        ssh_keys=tuple(order.ssh_keys),
        gpu_model=listing.gpu_model,
        # A multi-node order's parts form one private network across their nodes
        mesh_group=cluster_group(order.cluster_id) if order.cluster_id else "",
    )


def cluster_key_group(cluster_id: int) -> str:
    """The job group of a multi-node order's parts, whose peers share the buyer's one key and
    tunnel address (meshnet.key_claims), so the buyer's one tunnel reaches all its nodes."""
    return f"cluster:{cluster_id}"


def key_group(order: Order) -> str | None:
    """The job group whose peers share the order's key and tunnel address: a multi-node
    order's (cluster_key_group); None for a single order (its peer's own)."""
    return cluster_key_group(order.cluster_id) if order.cluster_id is not None else None


def provision_order(order_id: int) -> Order:
    """Allocate the job's address (of the jobs block) and desired peer on the provider node, and
    its sandbox (GPUs, address) in the same desired revision when the order has an image; pending ->
    provisioning. Idempotent: an order no longer pending is returned unchanged. If the mesh
    refuses (pool exhausted, key live elsewhere, too few GPUs) the order fails and its hold is
    released; but when the GPUs it needs are only still held by jobs that ended (freed once the
    agent removed their containers) it stays pending, nothing written, and
    tasks.sweep_pending_orders tries again, for up to MOLT_PROVISIONING_TIMEOUT_SECONDS.
    Locks: the node row, the order row (as stop_order: a buyer cancelling while the worker
    provisions waits instead of deadlocking), then the pool rows."""
    with transaction.atomic():
        order = _lock_node_then_order(order_id)
        if order.state != S.PENDING:
            return order
        try:
            with transaction.atomic():
                peer = create_job_peer(
                    order.listing.node,
                    order.wireguard_public_key,
                    ref=f"order:{order.pk}",
                    sandbox=sandbox_request(order),
                    key_group=key_group(order),
                )
        except NotEnoughGpus as exc:
            waited = timezone.now() - order.created_at
            if (
                exc.transient
                and waited.total_seconds() < settings.MOLT_PROVISIONING_TIMEOUT_SECONDS
            ):
                return order
            _release_and_end(order, S.PENDING, S.FAILED, f"provisioning failed: {exc}")
            return order
        except MeshError as exc:
            _release_and_end(order, S.PENDING, S.FAILED, f"provisioning failed: {exc}")
            return order
        lifecycle.transition(
            order, S.PENDING, S.PROVISIONING, "job address allocated", job_peer=peer
        )
        return order


def mark_running(order: Order, at: datetime) -> bool:
    """The agent acknowledged the job's peer: billing starts now. provisioning -> running."""
    return lifecycle.transition(
        order,
        S.PROVISIONING,
        S.RUNNING,
        "agent acknowledged the peer",
        running_since=at,
        ends_at=at + timedelta(hours=order.hours),
    )


def start_when_ready(order: Order) -> bool:
    """provisioning -> running once the job's peer is acknowledged and its sandbox, if it has
    one, is ready (sshd accepts): billing starts at the later of the two. A sandbox that failed
    (or stopped) first fails the order with the agent's detail as its reason, the hold released
    in full and peer and sandbox dropped from desired state. True when this call moved it.

    The one place both events land: the agent's ack (receivers.on_peer_acknowledged, in the ack's
    transaction) and the sandbox's report (receivers.on_sandbox_changed, after it commits).
    Locks: the node row, then the order row (already held by an ack: taking them again waits
    for nothing)."""
    with transaction.atomic():
        order = _lock_node_then_order(order.pk)
        if order.state != S.PROVISIONING or order.job_peer_id is None:
            return False
        peer = JobPeer.objects.get(pk=order.job_peer_id)
        sandbox = Sandbox.objects.filter(ref=peer.ref).first()
        if sandbox is not None and sandbox.state in (Sandbox.State.FAILED, Sandbox.State.STOPPED):
            why = f"sandbox {sandbox.state}: {sandbox.detail or 'no detail from the node'}"
            return _release_and_end(order, S.PROVISIONING, S.FAILED, why[:200])
        if peer.state != JobPeer.State.ACTIVE or peer.acked_at is None:
            return False
        if sandbox is None:
            at, why = peer.acked_at, "agent acknowledged the peer"
        elif sandbox.state == Sandbox.State.READY and sandbox.ready_at is not None:
            at, why = max(peer.acked_at, sandbox.ready_at), "peer acknowledged, sandbox ready"
        else:
            return False
        return lifecycle.transition(
            order,
            S.PROVISIONING,
            S.RUNNING,
            why,
            running_since=at,
            ends_at=at + timedelta(hours=order.hours),
        )


def end_if_sandbox_died(order: Order) -> bool:
    """A running order whose sandbox failed or stopped (the container died, the agent could not
    recreate it) fails: billed up to the agent's report (settled now, the rest of the hold
    released), its peer and sandbox dropped from desired state, as a lost node's orders are.
    True when this call ended it. Locks: as start_when_ready."""
    with transaction.atomic():
        order = _lock_node_then_order(order.pk)
        if order.state != S.RUNNING or order.job_peer_id is None:
            return False
        sandbox = Sandbox.objects.filter(ref=f"order:{order.pk}").first()
        if sandbox is None or sandbox.state not in (Sandbox.State.FAILED, Sandbox.State.STOPPED):
            return False
        at = sandbox.reported_at or timezone.now()
        why = f"sandbox {sandbox.state}: {sandbox.detail or 'no detail from the node'}"[:200]
        if not lifecycle.transition(order, S.RUNNING, S.FAILED, why, ended_at=at, reason=why):
            return False
        settle_order(order, cut_at=at)
        remove_job_peer(f"order:{order.pk}")
        return True


def _release_and_end(order: Order, from_state: str, to_state: str, reason: str) -> bool:
    """End the order (cancelled or failed) with its hold released in full and its peer, if any,
    dropped from desired state. False, nothing written, when it lost the race. Locks: the
    order row (the caller holds the node's), then the hold row and accounts."""
    if not lifecycle.transition(
        order, from_state, to_state, reason, ended_at=timezone.now(), reason=reason
    ):
        return False
    if order.cluster_id is not None:
        # A part of a multi-node order has no hold of its own: nothing of its share was
        # captured, and the cluster's hold releases the rest once every part has ended.
        cluster_ledger.part_ended(order)
    else:
        ledger.resolve_hold(
            order.hold, captured=0, fee=0, provider=None, memo=f"{to_state}: {reason}"
        )
    if order.job_peer_id:
        remove_job_peer(f"order:{order.pk}")
    return True


def _lock_node_then_order(order_pk: int) -> Order:
    """Lock the order's provider node row, then the order's, and return the order. Every path
    that changes an order together with its peer takes them in this order, as an agent's ack
    does (the node, then the orders of its peers), so they wait for each other instead of
    deadlocking. Call inside a transaction.

    A part of a multi-node order locks the nodes of every part, in primary-key order (as
    clusters.stop_cluster does): a change to one part's sandbox changes the node-to-node peers
    of the others' nodes (meshnet.mesh.bump_members), and two parts provisioned at once must
    wait for each other, so that the second sees the first."""
    node_id, cluster_id = (
        Order.objects.filter(pk=order_pk).values_list("listing__node_id", "cluster_id").get()
    )
    if cluster_id is None:
        Node.objects.select_for_update().filter(pk=node_id).first()
    else:
        nodes = Order.objects.filter(cluster_id=cluster_id).values_list("listing__node_id")
        list(Node.objects.select_for_update().filter(pk__in=nodes).order_by("pk"))
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
        if not stop_locked(order, reason):
            raise InvalidTransition(f"order {order.pk} is already {order.state}")
        return order


def stop_locked(order: Order, reason: str) -> bool:
    """stop_order's work on an order whose node and order rows the caller already locked
    (stop_order; marketplace.clusters stops every part of a multi-node order in one transaction
    this way). False, nothing written, when the order is stopping or ended."""
    if order.state in (S.PENDING, S.PROVISIONING):
        return _release_and_end(order, order.state, S.CANCELLED, reason)
    if order.state == S.RUNNING:
        lifecycle.transition(
            order, S.RUNNING, S.STOPPING, reason, stop_requested_at=timezone.now(), reason=reason
        )
        remove_job_peer(f"order:{order.pk}")
        return True
    return False


def complete_order(order: Order, at: datetime) -> bool:
    """The agent acknowledged the peer's removal: stopping -> completed, then settle."""
    with transaction.atomic():
        if not lifecycle.transition(
            order, S.STOPPING, S.COMPLETED, "agent removed the peer", ended_at=at
        ):
            return False
        settle_order(order)
        return True


def expire_orders(now: datetime | None = None) -> int:
    """Stop running orders whose booked time is up; move orders whose sandbox is ready or
    failed (start_when_ready, end_if_sandbox_died, in case its signal was lost); fail orders stuck
    provisioning past the timeout (hold released in full), unless their sandbox reported
    progress within it. Returns how many orders changed."""
    now = now or timezone.now()
    changed = 0
    for order in Order.objects.filter(state=S.RUNNING, ends_at__lte=now).only("pk"):
        try:
            stop_order(order, reason="booked time is up")
            changed += 1
        except InvalidTransition:
            pass  # stopped by someone else meanwhile
    changed += end_orders_of_lost_nodes(now)
    # Level-triggered repair: an order whose sandbox is already ready or failed (its
    # sandbox_changed lost to a crash after the report committed) moves now.
    settled_sandboxes = Sandbox.objects.filter(
        state__in=(Sandbox.State.READY, Sandbox.State.FAILED, Sandbox.State.STOPPED)
    ).values("ref")
    for order in Order.objects.filter(
        state__in=(S.PROVISIONING, S.RUNNING), job_peer__ref__in=settled_sandboxes
    ).only("pk"):
        changed += start_when_ready(order) or end_if_sandbox_died(order)
    deadline = now - timedelta(seconds=settings.MOLT_PROVISIONING_TIMEOUT_SECONDS)
    for order in Order.objects.filter(state=S.PROVISIONING, created_at__lte=deadline).only("pk"):
        with transaction.atomic():
            locked = _lock_node_then_order(order.pk)
            if locked.state != S.PROVISIONING:
                continue
            sandbox = Sandbox.objects.filter(ref=f"order:{locked.pk}").first()
            if sandbox is not None and sandbox.reported_at and sandbox.reported_at > deadline:
                # A cold pull of a large image takes minutes: a sandbox whose agent reported
                # progress within the timeout is still coming (an unchanged report does not
                # count: meshnet.sandboxes stores it once, so a stuck pull still times out).
                continue
            why = (
                "the provider node did not acknowledge in time"
                if sandbox is None or sandbox.reported_at is None
                else f"the sandbox was not ready in time (last: {sandbox.state})"
            )
            if _release_and_end(locked, S.PROVISIONING, S.FAILED, why):
                changed += 1
    return changed


def add_traffic(job_peer, *, rx_bytes: int, tx_bytes: int) -> None:
    """Add metered bytes to the job's order. rx is what the provider received from the buyer
    (the buyer's bytes_out), tx what it sent (the buyer's bytes_in). Atomic increments, so
    concurrent samples never lose an update."""
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
                moved = lifecycle.transition(
                    order, S.RUNNING, S.FAILED, why, ended_at=now, reason=why
                )
            else:
                moved = lifecycle.transition(order, S.STOPPING, S.COMPLETED, why, ended_at=now)
            if not moved:
                continue
            settle_order(order, cut_at=last_seen)
            remove_job_peer(f"order:{order.pk}")
            ended += 1
    return ended


def refuse_key_live_elsewhere(wireguard_public_key: str, own: Q | None = None) -> None:
    """MarketError naming wireguard_public_key when a live order other than those `own` selects
    (the order or the multi-node order being re-keyed; none for a new order) has the key."""
    live = Order.objects.live().filter(wireguard_public_key=wireguard_public_key)
    if (live if own is None else live.exclude(own)).exists():
        raise MarketError(
            "this WireGuard public key is already used by a live order; generate a new key pair",
            field="wireguard_public_key",
        )


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
        validate_peer_key(wireguard_public_key)
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
        if order.cluster_id is not None:
            raise MarketError(
                f"order {order.pk} is a part of multi-node order {order.cluster_id}, whose "
                "parts share one key: a part cannot be re-keyed alone",
                field="wireguard_public_key",
            )
        refuse_key_live_elsewhere(wireguard_public_key, Q(pk=order.pk))
        Order.objects.filter(pk=order.pk).update(wireguard_public_key=wireguard_public_key)
        if order.job_peer_id is not None:
            try:
                replace_peer_key(f"order:{order.pk}", wireguard_public_key)
            except MeshError as exc:
                raise MarketError(str(exc), field="wireguard_public_key") from None
        order_changed.send(sender=Order, order_id=order.pk)
        order.refresh_from_db()
        return order


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
