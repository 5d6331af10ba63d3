"""Thin Celery tasks of the mesh: take ids, re-read, call one service.

Imports point one way: the services that enqueue a task (meshnet.peers) import this module, and
this module imports only the services its tasks call, none of which enqueue."""

from __future__ import annotations

import logging
from datetime import timedelta

from asgiref.sync import async_to_sync
from celery import shared_task
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from meshnet import nodes
from meshnet.agent_channel import node_group
from meshnet.desired_state import signed_desired_state
from meshnet.models import MeteringSample, Node, UsedNonce

log = logging.getLogger(__name__)


@shared_task(acks_late=True)
def push_desired_state(node_pk: int) -> None:
    """Send the node's signed desired state to its agent's websocket group.

    The channel layer delivers at most once; nothing depends on this arriving, since the
    database holds desired and acknowledged revisions and the agent gets full state on connect.
    """
    node = Node.objects.filter(pk=node_pk, revoked_at__isnull=True).first()
    if node is None:
        return
    envelope = signed_desired_state(node)
    layer = get_channel_layer()
    if layer is None:
        return
    async_to_sync(layer.group_send)(
        node_group(node.node_id), {"type": "desired.state", "envelope": envelope}
    )


@shared_task(acks_late=True)
def repush_lagging_nodes() -> int:
    """Re-drive desired state to every node whose agent has not acknowledged the latest
    revision: the channel layer may have dropped the push, or the agent failed a peer."""
    ids = list(Node.objects.lagging().values_list("pk", flat=True))
    for node_pk in ids:
        push_desired_state(node_pk)
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
