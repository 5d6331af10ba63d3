"""A node's life on the mesh after enrolment: heartbeats (and the outages between them), its
GPU inventory, closing out a long-silent node's peer removals, revocation.

Locks, in meshnet's order: the node's row, then the keys it closes (in id order, as
meshnet.agent_channel takes them). revoke_node fires node_revoked outside any lock.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

from clawnode import wire
from clawnode.wire.messages import _IMAGE_RE
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from meshnet.agent_channel import AgentRefused, close_keys, node_group, record_report
from meshnet.allocation import release_address
from meshnet.channel_layer import group_send_on_commit
from meshnet.enrolment import replace_gpus
from meshnet.errors import EnrollmentRefused
from meshnet.key_claims import release_unclaimed
from meshnet.models import Gpu, JobPeer, JobPeerKey, Node, NodeOutage
from meshnet.sandboxes import release_sandboxes
from meshnet.signals import node_changed, node_revoked

log = logging.getLogger(__name__)


def record_heartbeat(
    node: Node, observed_ip: str | None = None, at: datetime | None = None
) -> None:
    """Mark `node` seen now (or at `at`). `node` is the row as read before this heartbeat: its
    owner's pages are told only when that changes what they show (offline to online, a new
    source address), not on every heartbeat.

    A heartbeat after a silence longer than MOLT_NODE_OFFLINE_AFTER_SECONDS records a
    NodeOutage from the last heartbeat to this one (billing leaves it out). last_seen_at is
    compare-and-set against the value read, so of two racing heartbeats one records the gap, and
    it never moves back."""
    at = at or timezone.now()
    fields: dict[str, Any] = {"last_seen_at": at}
    if observed_ip:
        fields["observed_ip"] = observed_ip
    with transaction.atomic():
        previous = Node.objects.values_list("last_seen_at", flat=True).get(pk=node.pk)
        if previous is not None and at <= previous:
            del fields["last_seen_at"]  # a late heartbeat does not move the clock back
        seen = Q(last_seen_at=previous) if previous is not None else Q(last_seen_at__isnull=True)
        changed = bool(fields) and Node.objects.filter(seen, pk=node.pk).update(**fields) == 1
        gap = (at - previous).total_seconds() if previous is not None else 0.0
        if changed and "last_seen_at" in fields and gap > settings.MOLT_NODE_OFFLINE_AFTER_SECONDS:
            NodeOutage.objects.create(node_id=node.pk, started_at=previous, ended_at=at)
    if not node.online or (observed_ip and observed_ip != node.observed_ip):
        node_changed.send(sender=Node, node=node, change="online")


def update_inventory(
    node: Node,
    gpus: list[Mapping[str, Any]],
    health: list[Mapping[str, Any]] | None = None,
    reason: str = "",
    images: object = None,
    names: object = None,
) -> None:
    """Take the node's GPU inventory as its agent reports it (NVML or simulated), and `images`,
    the sandbox images its agent is configured to run (None: an agent that does not say, so
    the node keeps what it had).

    An empty report with a reason (the driver failed to answer) keeps the GPUs we know and
    records the reason: a hiccup must not make listed GPUs vanish. Live readings (temperature,
    utilisation) update in place. A malformed `images` is refused (AgentRefused naming it)
    before anything is written. `names`: whether the agent runs its names responder (None:
    an agent that predates it, so no); anything but a boolean is refused likewise. A node
    revoked (or deleted) meanwhile is refused (AgentRefused, 4403), nothing written."""
    parsed = tuple(wire.GpuInfo.from_dict(gpu) for gpu in gpus)
    if names is not None and not isinstance(names, bool):
        raise AgentRefused("inventory.names must be true or false", wire.CLOSE_BAD_MESSAGE)
    image_list = None if images is None else check_images(images)
    readings = _health_readings(health)
    differing = _readings_only(node, parsed, readings, reason, image_list, bool(names))
    if differing is not None:
        # Nothing but live readings differ (if anything): GPU rows updated in place need no
        # lock of the node's row, which every batch of acks and heartbeats takes. One GPU's
        # UPDATE is atomic alone: no transaction's two extra round trips.
        if differing:
            with transaction.atomic() if len(differing) > 1 else nullcontext():
                if _write_readings(node, differing):
                    node_changed.send(sender=Node, node=node, change="inventory")
        return
    changed = False
    with transaction.atomic():
        locked = Node.objects.select_for_update().filter(pk=node.pk).first()
        if locked is None or locked.revoked_at is not None:
            raise AgentRefused("node revoked", wire.CLOSE_FORBIDDEN)
        if image_list is not None and image_list != locked.images:
            Node.objects.filter(pk=node.pk).update(images=image_list)
            node.images = image_list
            changed = True
        responder = bool(names)
        if responder != locked.names_responder:
            Node.objects.filter(pk=node.pk).update(names_responder=responder)
            node.names_responder = responder
        if parsed:
            known = list(node.gpus.order_by("index").values_list(
                "index", "name", "memory_mb", "uuid", "simulated"
            ))  # fmt: skip
            reported = [(g.index, g.name, g.memory_mb, g.uuid, g.simulated) for g in parsed]
            if known != reported:
                try:
                    replace_gpus(node, parsed)
                except EnrollmentRefused as exc:
                    raise AgentRefused(str(exc), wire.CLOSE_BAD_MESSAGE) from None
                changed = True
        elif reason:
            record_report(node, f"GPU inventory: {reason}")
        changed |= _write_readings(node, readings)
        # The agent resends its inventory every minute: the owner's pages hear of a difference.
        if changed:
            node_changed.send(sender=Node, node=node, change="inventory")


def _health_readings(health: Any) -> list[tuple[int, dict[str, int | None]]]:
    """The well-formed readings of `health`, in order: (GPU index, the values to store)."""
    out = []
    for reading in health or []:
        if not isinstance(reading, Mapping) or not isinstance(reading.get("index"), int):
            continue
        values = {
            "temperature_c": _small_int(reading.get("temperature_c")),
            "utilization_pct": _small_int(reading.get("utilization_pct")),
        }
        out.append((reading["index"], values))
    return out


def _write_readings(node: Node, readings: list[tuple[int, dict[str, int | None]]]) -> bool:
    """Store the GPU readings; whether any differed (only one that differs is written, and so
    announced). A statement of its own, the same text each time: built by the ORM (a filter, an
    exclude of the values, an update) it was most of the cost of an inventory with new
    readings, which a real GPU's temperature makes most of them (py-spy, 2,000 agents)."""
    changed = False
    with connection.cursor() as cursor:
        for index, values in readings:
            temperature, utilization = values["temperature_c"], values["utilization_pct"]
            cursor.execute(
                _write_readings_sql(connection.vendor),
                [temperature, utilization, node.pk, index, temperature, utilization],
            )
            changed |= cursor.rowcount > 0
    return changed


@functools.cache
def _write_readings_sql(vendor: str) -> str:
    """One GPU's readings, written only where either differs (NULL included: the null-safe
    comparison is IS DISTINCT FROM in PostgreSQL, IS NOT in SQLite)."""
    quote = connection.ops.quote_name
    table = quote(Gpu._meta.db_table)
    node, index, temperature, utilization = (
        quote(Gpu._meta.get_field(f).column)
        for f in ("node", "index", "temperature_c", "utilization_pct")
    )
    differs = "IS DISTINCT FROM" if vendor == "postgresql" else "IS NOT"
    # Only quoted names of this model and placeholders go into the text.
    return (
        f"UPDATE {table} SET {temperature} = %s, {utilization} = %s "  # noqa: S608
        f"WHERE {node} = %s AND {index} = %s "
        f"AND ({temperature} {differs} %s OR {utilization} {differs} %s)"
    )


# The GPU columns _readings_only compares: the inventory's five, then the two live readings.
_GPU = ("index", "name", "memory_mb", "uuid", "simulated", "temperature_c", "utilization_pct")


@functools.cache
def _node_with_gpus_sql(vendor: str) -> str:
    """The text of _node_with_gpus's query (per database vendor: its quoting)."""
    quote = connection.ops.quote_name
    node, gpu = (quote(model._meta.db_table) for model in (Node, Gpu))
    fields = ("id", "revoked_at", "images", "names_responder")
    n = {f: quote(Node._meta.get_field(f).column) for f in fields}
    g = {f: quote(Gpu._meta.get_field(f).column) for f in (*_GPU, "node")}
    gpus = ", ".join(f"g.{g[f]}" for f in _GPU)
    # Only quoted names of these models and a placeholder go into the text.
    return (
        f"SELECT n.{n['revoked_at']}, n.{n['images']}, n.{n['names_responder']}, {gpus} "  # noqa: S608
        f"FROM {node} n LEFT JOIN {gpu} g ON g.{g['node']} = n.{n['id']} "
        f"WHERE n.{n['id']} = %s ORDER BY g.{g['index']}"
    )


def _node_with_gpus(pk: int) -> list[tuple[Any, ...]]:
    """(revoked_at, images, names_responder, *_GPU) of node `pk`, a row per GPU in index order
    (one of NULL GPU columns for a node without GPUs); none for no such node. SQL of its own,
    the same text each time: built by the ORM, this one query was still most of an
    inventory's cost in the web process (cloning and compiling the join; py-spy)."""
    with connection.cursor() as cursor:
        cursor.execute(_node_with_gpus_sql(connection.vendor), [pk])
        rows = cursor.fetchall()
    # As the ORM reads them: the JSON list from its text, SQLite's booleans from 0 and 1.
    images = Node._meta.get_field("images")
    out = []
    for revoked_at, stored, responder, *gpu in rows:
        if gpu[4] is not None:
            gpu[4] = bool(gpu[4])  # simulated
        out.append(
            (revoked_at, images.from_db_value(stored, None, connection), bool(responder), *gpu)
        )
    return out


def _readings_only(
    node: Node,
    parsed: tuple[wire.GpuInfo, ...],
    readings: list[tuple[int, dict[str, int | None]]],
    reason: str,
    image_list: list[str] | None,
    responder: bool,
) -> list[tuple[int, dict[str, int | None]]] | None:
    """The readings that differ from the stored ones when nothing else of the inventory does
    (an empty list: nothing to write), read without locks or a transaction (one query, the
    node's row joined with its GPUs'); None when the GPUs, images or names responder differ or
    a reason is to be recorded. AgentRefused (4403) for a node revoked or gone.

    Every agent sends its inventory on connect and every minute, its GPUs nearly always the
    same; the locked path (a transaction holding the node's row lock) was most of a gateway
    restart's connect wave, queued behind the batches of acks that lock every node's row.
    What differs beyond readings goes through the locked path, which compares again under
    the lock. With 2,000 idle agents, these reads were the largest share of the web
    process's CPU after the thread hops (py-spy, benchmarks/agent_plane.py): one query, not
    three (the connection's check that the node is not revoked was one)."""
    if not parsed and reason:
        return None  # the reason is recorded
    rows = _node_with_gpus(node.pk)
    if not rows or rows[0][0] is not None:
        raise AgentRefused("node revoked", wire.CLOSE_FORBIDDEN)
    _revoked, stored_images, stored_responder = rows[0][:3]
    if (image_list is not None and image_list != stored_images) or responder != stored_responder:
        return None
    # A node without GPUs is one row of NULLs (the join is an outer one).
    known = [row[3:] for row in rows if row[3] is not None]
    if parsed and [k[:5] for k in known] != [
        (g.index, g.name, g.memory_mb, g.uuid, g.simulated) for g in parsed
    ]:
        return None
    stored = {k[0]: (k[5], k[6]) for k in known}
    differing = []
    for index, values in readings:  # in order: a later reading of a GPU compares with an earlier
        reading = (values["temperature_c"], values["utilization_pct"])
        if index in stored and stored[index] != reading:
            differing.append((index, values))
            stored[index] = reading
    return differing


MAX_IMAGES = 64


def check_images(images: object) -> list[str]:
    """The inventory's `images`: a list of at most MAX_IMAGES distinct image references, each
    as a SandboxSpec takes it; AgentRefused (4400) naming the field otherwise."""
    if not isinstance(images, list) or len(images) > MAX_IMAGES:
        raise AgentRefused(
            f"images must be a list of at most {MAX_IMAGES} image references",
            wire.CLOSE_BAD_MESSAGE,
        )
    for i, image in enumerate(images):
        if not isinstance(image, str) or not _IMAGE_RE.fullmatch(image):
            raise AgentRefused(f"images[{i}] is not an image reference", wire.CLOSE_BAD_MESSAGE)
    if len(set(images)) != len(images):
        raise AgentRefused("images has duplicates", wire.CLOSE_BAD_MESSAGE)
    return list(images)


def _small_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1000:
        return value
    return None


def close_out_silent_nodes(now: datetime | None = None) -> int:
    """Close out the peer removals no agent will acknowledge: on a node (not revoked) silent
    for MOLT_NODE_ABANDONED_AFTER_SECONDS, peers still `removing` become `removed`, their job
    addresses go into quarantine and their keys are closed (so the key and the address can be
    used again). Their orders ended long before, through the node-failure grace, so no order
    is told. If the node comes back, its agent gets a desired state without these peers and
    removes them; samples of their closed keys count nothing. Returns how many peers.

    Locks: each node row in turn (re-checking its silence under the lock, so a heartbeat that
    just arrived keeps its peers), then the keys it closes, as revoke_node does."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.MOLT_NODE_ABANDONED_AFTER_SECONDS)
    candidates = (
        Node.objects.filter(
            revoked_at__isnull=True,
            last_seen_at__lt=cutoff,
            job_peers__state=JobPeer.State.REMOVING,
        )
        .distinct()
        .values_list("pk", flat=True)
    )
    closed = 0
    for node_pk in list(candidates):
        with transaction.atomic():
            node = Node.objects.select_for_update().get(pk=node_pk)
            if node.revoked_at is not None or node.last_seen_at is None:
                continue
            if node.last_seen_at >= cutoff:
                continue
            peers = list(
                JobPeer.objects.filter(node=node, state=JobPeer.State.REMOVING).select_related(
                    "allocation"
                )
            )
            for peer in peers:
                JobPeer.objects.filter(pk=peer.pk, state=JobPeer.State.REMOVING).update(
                    state=JobPeer.State.REMOVED, removed_at=now, key_claim=None
                )
                if peer.allocation is not None:
                    release_address(peer.allocation)
            release_unclaimed(peer.key_claim_id for peer in peers)
            # Their sandboxes, dropped from desired state with them, go too (GPUs, addresses).
            release_sandboxes(node, [peer.ref for peer in peers], now)
            close_keys(JobPeerKey.objects.filter(job_peer__in=peers), now)
            closed += len(peers)
            log.warning(
                "node %s silent since %s: %d peer removal(s) closed out without its ack",
                node.name,
                node.last_seen_at.isoformat(),
                len(peers),
            )
    return closed


def revoke_node(node: Node, reason: str = "revoked by an operator") -> bool:
    """Cut `node` off the mesh for good. Returns True when this call revoked it, False when it
    already was (the clean-up below still runs, so calling again re-drives a clean-up that a
    crash interrupted).

    1. revoked_at is set by compare-and-set and committed on its own: from then on the agent's
       frames and any new auth are refused, its listings are no longer available, and its agent
       connection is told to close (after commit, through its group).
    2. node_revoked fires outside any lock; marketplace fails the node's live orders there,
       each in its own transaction in the market's lock order (order row, then this node row).
    3. Job peers still live on the node are closed out (removed now, addresses quarantined):
       no agent will acknowledge their removal any more. Locks: node row, one transaction.
    """
    now = timezone.now()
    with transaction.atomic():
        revoked = bool(
            Node.objects.filter(pk=node.pk, revoked_at__isnull=True).update(revoked_at=now)
        )
        node.refresh_from_db()
        if revoked:
            group_send_on_commit(node_group(node.node_id), {"type": "node.revoked"})
            node_changed.send(sender=Node, node=node, change="revoked")
            log.warning("node %s revoked: %s", node.name, reason)
    node_revoked.send(sender=Node, node=node, reason=reason)
    with transaction.atomic():
        Node.objects.select_for_update().get(pk=node.pk)
        live = list(JobPeer.objects.filter(node=node).live().select_related("allocation"))
        for peer in live:
            JobPeer.objects.filter(pk=peer.pk).update(
                state=JobPeer.State.REMOVED, removed_at=peer.removed_at or now, key_claim=None
            )
            if peer.allocation is not None:
                release_address(peer.allocation)
        release_unclaimed(peer.key_claim_id for peer in live)
        # Their sandboxes too: no agent will report them gone.
        release_sandboxes(node, [peer.ref for peer in live], now)
        # A revoked node's samples are refused: its keys take nothing more and may be reused.
        close_keys(JobPeerKey.objects.filter(job_peer__node=node), now)
    return revoked
