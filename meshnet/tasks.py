"""Thin Celery tasks of the mesh: take ids, re-read, call one service.

Imports point one way: the services that enqueue a task (meshnet.peers) import this module, and
this module imports only the services its tasks call, none of which enqueue."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from meshnet import gateway_key, nodes
from meshnet.channel_layer import send_many
from meshnet.desired_state import signed_desired_states
from meshnet.fanout import AGENTS_GROUP, states_message
from meshnet.models import MeteringSample, Node, UsedNonce
from meshnet.names import signed_names_of

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400


@shared_task
def rotate_gateway_key_if_due() -> bool:
    """Automatic rotation of the gateway's signing key (beat, daily): once the current key has
    signed for MOLT_GATEWAY_KEY_MAX_AGE_DAYS (0 turns it off), rotate_gateway_key. True when it
    rotated. Not acks_late: a rotation redelivered after a crash would be checked again anyway,
    and the age test under the rotation lock makes two at once rotate once."""
    days = settings.MOLT_GATEWAY_KEY_MAX_AGE_DAYS
    if days <= 0:
        return False
    return rotate_gateway_key(if_signed_for_days=days) is not None


def rotate_gateway_key(
    *, if_signed_for_days: float | None = None, push: bool = True
) -> tuple[gateway_key.Rotation, int | None] | None:
    """Rotate the gateway's key (meshnet.gateway_key.rotate_gateway_key: certified by the old
    one, agents follow without re-joining), then give every live node a new desired revision
    (its state changed: the new key signs it and its hub peer has the new key) and, with `push`,
    send every live node its state now. The revision bump makes a push the channel layer
    drops (or none) good through the repush-lagging-nodes sweep instead of waiting for the
    node's next change or reconnect. Returns the rotation and how many states were pushed
    (None without `push`), or None when `if_signed_for_days` says it is not due yet."""
    rotation = gateway_key.rotate_gateway_key(
        if_signed_for=None if if_signed_for_days is None else if_signed_for_days * SECONDS_PER_DAY
    )
    if rotation is None:
        return None
    log.info(
        "gateway key rotated: %s -> %s (certificate %d)",
        rotation.old_key,
        rotation.new_key,
        rotation.sequence,
    )
    pks = _bump_live_nodes()
    return rotation, (push_desired_states(pks) if push else None)


def _bump_live_nodes() -> list[int]:
    """A new desired revision for every live node, in one transaction; rows locked in
    primary-key order, as everywhere in meshnet."""
    with transaction.atomic():
        pks = list(
            Node.objects.select_for_update()
            .filter(revoked_at__isnull=True)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        Node.objects.filter(pk__in=pks).update(desired_revision=F("desired_revision") + 1)
    return pks


@shared_task(acks_late=True)
def push_desired_state(node_pk: int) -> None:
    """Send the node's signed desired state to its agent's websocket group (push_desired_states
    for one node: what a write path enqueues after its commit)."""
    push_desired_states([node_pk])


@shared_task(acks_late=True)
def push_desired_states(node_pks: list[int]) -> int:
    """Send each node's signed desired state to its agent: PUSH_CHUNK nodes' states at a time,
    read in three queries (meshnet.desired_state.desired_states), as one message to the web
    processes that hold agents (meshnet.fanout), each chunk on its way over the channel layer's
    persistent connections (meshnet.channel_layer.send_many) while the next is read and signed.
    Revoked nodes are left out. Returns how many states were sent.

    The channel layer delivers at most once; nothing depends on this arriving, since the
    database holds desired and acknowledged revisions and the agent gets full state on connect.
    """
    live = Node.objects.filter(pk__in=list(node_pks), revoked_at__isnull=True).order_by("pk")
    sizes: list[int] = []

    def messages():
        chunk: list[Node] = []
        for node in live.iterator(chunk_size=PUSH_CHUNK):
            chunk.append(node)
            if len(chunk) >= PUSH_CHUNK:
                sizes.append(len(chunk))
                yield _signed(chunk)
                chunk = []
        if chunk:
            sizes.append(len(chunk))
            yield _signed(chunk)

    sent = send_many(messages())
    return sum(size for size, ok in zip(sizes, sent, strict=False) if ok)


# Nodes whose states go in one message: a first chunk small enough to leave at once (a state
# with no peers is about 1 KiB signed).
PUSH_CHUNK = 100


def _signed(nodes_: list[Node]) -> tuple[str, dict]:
    envelopes, names = signed_desired_states(nodes_), signed_names_of(nodes_)
    return AGENTS_GROUP, states_message(
        {node.node_id: envelopes[node.pk] for node in nodes_},
        names={node.node_id: names[node.pk] for node in nodes_},
    )


@shared_task(acks_late=True)
def repush_lagging_nodes() -> int:
    """Re-drive desired state to every node whose agent has not acknowledged the latest
    revision: the channel layer may have dropped the push, or the agent failed a peer. One
    batch, sent in one async run."""
    ids = list(Node.objects.lagging().values_list("pk", flat=True))
    push_desired_states(ids)
    return len(ids)


@shared_task(acks_late=True)
def prune_used_nonces() -> int:
    """Forget the nonces no replay could use any more.

    A signed request is accepted only within MOLT_ENROLLMENT_MAX_SKEW_SECONDS of its own
    timestamp, so a copy of one accepted at `seen_at` is refused as stale once twice the skew has
    passed, whatever its nonce; remembering the nonce beyond that (plus a minute for clocks)
    protects nothing. Returns how many were deleted."""
    keep = 2 * settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS + 60
    deleted, _ = UsedNonce.objects.filter(
        seen_at__lt=timezone.now() - timedelta(seconds=keep)
    ).delete()
    return deleted


# Rows deleted per statement: each batch is its own short transaction, so pruning a day of a
# large mesh (8,640 samples a node) never holds a long lock or one huge transaction.
PRUNE_BATCH = 5000


@shared_task(acks_late=True)
def prune_metering_samples() -> int:
    """Delete the metering samples received more than MOLT_METERING_RETENTION_DAYS ago, oldest
    first, in batches. Billing does not read them (each key keeps its own base and totals, see
    meshnet.metering), so this changes no bill; it ends the proof of bills far older than any
    dispute window, and the usage chart of orders that old. Returns how many were deleted."""
    cutoff = timezone.now() - timedelta(days=settings.MOLT_METERING_RETENTION_DAYS)
    deleted = 0
    while True:
        batch = list(
            MeteringSample.objects.filter(received_at__lt=cutoff)
            .order_by("received_at")
            .values_list("pk", flat=True)[:PRUNE_BATCH]
        )
        if not batch:
            return deleted
        deleted += MeteringSample.objects.filter(pk__in=batch).delete()[0]


@shared_task(acks_late=True)
def close_out_silent_nodes() -> int:
    """Release the job addresses and keys of peer removals that a long-silent node will never
    acknowledge (meshnet.nodes.close_out_silent_nodes)."""
    return nodes.close_out_silent_nodes()
