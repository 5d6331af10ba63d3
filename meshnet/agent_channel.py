"""What a node's agent says over its websocket (meshnet.consumers), checked and recorded: its
challenge-response auth, acks of desired revisions, reports of removed peers, signed metering
samples, sandbox status reports (recorded by meshnet.sandboxes), complaints. Heartbeats and
inventory, which describe the node itself, are in meshnet.nodes.

Lock order: the node's row, then its JobPeerKey rows in id order, then (through the signals
peer_acknowledged, peer_removed and peer_traffic) marketplace's orders.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from clawnode import wire
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from meshnet import metering
from meshnet.allocation import release_address
from meshnet.gateway_key import gateway_identity
from meshnet.hub import hub_public_key
from meshnet.key_claims import release_unclaimed
from meshnet.models import JobPeer, JobPeerKey, MeteringSample, Node
from meshnet.sandboxes import record_sandbox_status, release_sandboxes
from meshnet.signals import peer_acknowledged, peer_removed, peer_traffic

log = logging.getLogger(__name__)


class AgentRefused(Exception):
    """An agent's frame was refused; `close_code` tells the agent whether to retry."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


def node_group(node_id: str) -> str:
    """The Channels group an agent's websocket joins."""
    return f"node.{node_id}"


def authenticate_agent(envelope: Mapping[str, Any], *, challenge: str) -> Node:
    """Check an AGENT_AUTH answer to this connection's `challenge`: the node exists and is not
    revoked, the signature is its identity's, the challenge is ours and the clock is close."""
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    try:
        auth = wire.AgentAuth.from_dict(body if isinstance(body, Mapping) else {})
    except wire.ProtocolError as exc:
        raise AgentRefused(f"bad auth message: {exc}", wire.CLOSE_BAD_MESSAGE) from None
    node = Node.objects.filter(node_id=auth.node_id).first()
    if node is None or node.revoked_at is not None:
        raise AgentRefused("unknown or revoked node: enrol again", wire.CLOSE_FORBIDDEN)
    try:
        wire.open_envelope(envelope, base64.b64decode(node.identity_public_key), wire.AGENT_AUTH)
    except wire.BadSignature as exc:
        raise AgentRefused(f"auth signature refused: {exc}", wire.CLOSE_AUTH_FAILED) from None
    if not secrets.compare_digest(auth.challenge, challenge):
        raise AgentRefused("auth answers another connection's challenge", wire.CLOSE_AUTH_FAILED)
    try:
        wire.check_fresh(
            auth.timestamp,
            int(timezone.now().timestamp()),
            max_skew=settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS,
        )
    except wire.StaleMessage as exc:
        raise AgentRefused(f"stale auth: {exc}", wire.CLOSE_AUTH_FAILED) from None
    return node


_NodeMessage = TypeVar(
    "_NodeMessage", wire.Ack, wire.Removed, wire.MeteringSample, wire.SandboxStatus
)


def _open_node_message(
    node: Node, envelope: object, kind: str, message: type[_NodeMessage], what: str
) -> _NodeMessage:
    """The body of a message `node` signed, of `kind`, parsed as `message`; AgentRefused (4400)
    when the signature is not the node's, the body is malformed or it names another node."""
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    try:
        wire.open_envelope(envelope, base64.b64decode(node.identity_public_key), kind)
        parsed = message.from_dict(body if isinstance(body, Mapping) else {})
    except (wire.BadSignature, wire.ProtocolError) as exc:
        raise AgentRefused(f"{what} refused: {exc}", wire.CLOSE_BAD_MESSAGE) from None
    if parsed.node_id != node.node_id:
        raise AgentRefused(f"{what} names another node", wire.CLOSE_BAD_MESSAGE)
    return parsed


def process_ack(node: Node, envelope: Mapping[str, Any]) -> wire.Ack:
    """Verify a signed ACK from `node` and record it (see acknowledge_revision). An ack of the
    first version (an agent not yet upgraded) has no `removing`: its removals are done."""
    checked = check_ack(node, envelope)
    record_checked_ack(node, checked)
    return checked.ack


@dataclass(frozen=True)
class CheckedAck:
    """An ack verified as `node`'s: its revision, the keys it failed to apply (the hub's left
    out, see check_ack) and the keys still leaving the interface."""

    ack: wire.Ack
    failed: frozenset[str]

    @property
    def revision(self) -> int:
        return self.ack.revision

    @property
    def removing(self) -> frozenset[str]:
        return frozenset(self.ack.removing)


def check_ack(node: Node, envelope: Mapping[str, Any]) -> CheckedAck:
    """The verification half of process_ack (AgentRefused 4400 when refused); records only the
    report of a hub peer the node could not add."""
    sent_as = envelope.get("kind") if isinstance(envelope, Mapping) else None
    kind = wire.ACK_V1 if sent_as == wire.ACK_V1 else wire.ACK
    ack = _open_node_message(node, envelope, kind, wire.Ack, "ack")
    if kind == wire.ACK_V1 and ack.removing:
        raise AgentRefused("ack refused: a v1 ack has no removing", wire.CLOSE_BAD_MESSAGE)
    failed = ack.failed_keys
    hub_key = hub_public_key()
    if hub_key in failed:
        # Discovery is best effort: a node that cannot add the hub (its endpoint's name does
        # not resolve there) must not hold its job peers' revision back, which would re-push
        # it forever. The operator sees why; the next state the node gets retries the hub.
        detail = next((r.detail for r in ack.results if r.public_key == hub_key), "")
        record_report(node, f"could not add the gateway hub peer: {detail}")
        failed = failed - {hub_key}
    return CheckedAck(ack, frozenset(failed))


def record_checked_ack(node: Node, checked: CheckedAck) -> None:
    """The recording half of process_ack: acknowledge_revision, AgentRefused 4400 for a
    revision ahead of the desired one."""
    try:
        acknowledge_revision(node, checked.revision, checked.failed, removing_keys=checked.removing)
    except ValueError as exc:
        raise AgentRefused(str(exc), wire.CLOSE_BAD_MESSAGE) from None


def acknowledge_revision(
    node: Node,
    revision: int,
    failed_keys: frozenset[str] = frozenset(),
    at: datetime | None = None,
    removing_keys: frozenset[str] = frozenset(),
) -> None:
    """Record that `node`'s agent applied desired state `revision`.

    Peers added at or before `revision` (and not in `failed_keys`) become active and fire
    peer_acknowledged; peers removed at or before it are gone (see _record_gone). Keys in
    `failed_keys` stay as they are. Keys in `removing_keys` are still on the interface, cut
    off, their final counters not yet read: they stay open until a REMOVED message names them
    (record_removed). A stale or repeated ack changes nothing else. Locks: node row, then the
    keys it closes.
    """
    at = at or timezone.now()
    with transaction.atomic():
        locked = Node.objects.select_for_update().get(pk=node.pk)
        if revision > locked.desired_revision:
            raise ValueError(
                f"acknowledged revision {revision} is ahead of "
                f"desired revision {locked.desired_revision}"
            )
        # A revision with failed peers is not fully applied: leaving acked_revision behind makes
        # the reconciler push it again, and the agent retries the failed peers. Peers still
        # leaving are applied (cut off); their removal follows without another push.
        if revision > locked.acked_revision and not failed_keys:
            Node.objects.filter(pk=locked.pk).update(acked_revision=revision)
        _record_gone(
            locked,
            Q(retired_revision__lte=revision),
            Q(removed_revision__lte=revision),
            at,
            exclude=failed_keys | removing_keys,
        )
        added = JobPeer.objects.filter(
            node=locked, state=JobPeer.State.DESIRED, added_revision__lte=revision
        ).exclude(public_key__in=failed_keys)
        for peer in added:
            if JobPeer.objects.filter(pk=peer.pk, state=JobPeer.State.DESIRED).update(
                state=JobPeer.State.ACTIVE, acked_at=at
            ):
                peer.refresh_from_db()
                peer_acknowledged.send(sender=JobPeer, job_peer=peer, at=at)


def process_removed(node: Node, envelope: Mapping[str, Any]) -> wire.Removed:
    """Verify a signed REMOVED message from `node` and record it (see record_removed)."""
    removed = _open_node_message(node, envelope, wire.REMOVED, wire.Removed, "removal report")
    record_removed(node, frozenset(removed.public_keys))
    return removed


def record_removed(node: Node, public_keys: frozenset[str], at: datetime | None = None) -> None:
    """Record that `node`'s agent removed the peers with `public_keys` from its interface, their
    final counters sent before (see wire.Removed). Only keys the gateway took off the node
    are affected: a retired key of a re-key, or the key of a peer being removed. Idempotent.
    Locks: node row, then the keys it closes."""
    at = at or timezone.now()
    with transaction.atomic():
        locked = Node.objects.select_for_update().get(pk=node.pk)
        _record_gone(
            locked,
            Q(retired_revision__isnull=False, public_key__in=public_keys),
            Q(public_key__in=public_keys),
            at,
        )


def _record_gone(
    node: Node,
    retired_keys: Q,
    removed_peers: Q,
    at: datetime,
    exclude: frozenset[str] = frozenset(),
) -> None:
    """Keys and peers the node no longer has. Keys retired by a re-key (`retired_keys`) and the
    keys of removed peers (`removed_peers`, among the node's REMOVING peers) are closed: the
    agent sent their final counters before, so no later sample is billed to them. Those peers
    become removed, their address goes into quarantine, and peer_removed fires. Keys in
    `exclude` are left as they are. Call inside a transaction holding the node's row."""
    removing = JobPeer.objects.filter(node=node, state=JobPeer.State.REMOVING).filter(removed_peers)
    # Closed before the receivers below lock orders, so this never holds an order row while it
    # waits for a key row that a metering sample holds.
    gone = retired_keys | Q(job_peer__in=removing.values("pk"))
    close_keys(
        JobPeerKey.objects.filter(gone, job_peer__node=node).exclude(public_key__in=exclude), at
    )
    for peer in removing.exclude(public_key__in=exclude):
        token = peer.key_claim_id
        if JobPeer.objects.filter(pk=peer.pk, state=JobPeer.State.REMOVING).update(
            state=JobPeer.State.REMOVED, removed_at=at, key_claim=None
        ):
            peer.refresh_from_db()
            if peer.allocation_id is not None:
                release_address(peer.allocation)
            release_unclaimed([token])
            # The agent removes a job's container before its peer: the peer gone, its GPUs and
            # sandbox address are free (meshnet.sandboxes).
            release_sandboxes(node, [peer.ref], at)
            peer_removed.send(sender=JobPeer, job_peer=peer, at=at)


def process_sandbox_status(node: Node, envelope: Mapping[str, Any]) -> wire.SandboxStatus:
    """Verify a SANDBOX_STATUS message `node` signed and record it (meshnet.sandboxes.
    record_sandbox_status: only `node`'s sandboxes, states forward only; sandbox_changed after
    commit). AgentRefused (4400), nothing written, when the signature is not the node's, the
    body is malformed or it names another node."""
    status = _open_node_message(
        node, envelope, wire.SANDBOX_STATUS, wire.SandboxStatus, "sandbox status"
    )
    record_sandbox_status(node, status)
    return status


def ingest_metering(node: Node, envelope: Mapping[str, Any]) -> int:
    """Verify a signed metering sample from `node` (check_metering) and record it
    (record_metering); returns the number of peers billed."""
    return record_metering(node, envelope, check_metering(node, envelope))


def check_metering(node: Node, envelope: object) -> wire.MeteringSample:
    """The verification half of ingest_metering, with no database work: the sample, signed by
    `node` and naming it; AgentRefused (4400) when not. The agent connection calls it on its
    event loop, and hops to a database thread only for a sample that names peers: the thread
    hop for each idle node's sample (every 10 s, no peers) was about a tenth of the web
    process's CPU with idle agents (py-spy, benchmarks/agent_plane.py)."""
    return _open_node_message(node, envelope, wire.METERING, wire.MeteringSample, "metering sample")


def record_metering(node: Node, envelope: Mapping[str, Any], sample: wire.MeteringSample) -> int:
    """Store `sample`, the body of `envelope` as check_metering verified it, once and turn its
    counters into deltas.

    Each public key in the sample is resolved to the open JobPeerKey of `node` that has it (the
    peer's current key, or one retired by a re-key whose final counters are still to come; see
    JobPeerKey); keys with none are ignored: not stored (a node cannot fill the table with keys
    it has no peer for, issue 14), counted in the stored body's "ignored_keys" and logged. The
    sample is stored as signed when it names only open keys (an honest agent's case: the bill
    can be proved from the row alone); with keys left out, its body no longer matches the
    signature, which is then not kept. A sample naming no open key is not stored at all: it
    bills nothing and proves nothing. The delta against each key's own base (see
    meshnet.metering) is added to the key's totals under a row lock, all keys in one UPDATE,
    and each peer's bytes over its keys are announced once with peer_traffic, all in one
    transaction with the stored sample. A resent sample (same boot_id and seq) changes nothing.
    A sample older than the one that last moved a key's base, in the same epoch (a lower seq of
    the same boot, or across boots an earlier sampled_at, or the same second and lower
    counters: meshnet.metering.stale), is stored but bills nothing for that key and leaves its
    base alone: its lower reading is no restart. Returns the number of peers billed. Refused
    (4403) for a node revoked meanwhile. Locks: the node's row, then its open keys in id order,
    then (through peer_traffic) the orders."""
    if not sample.peers:
        return 0  # an idle node's sample (every 10 s): nothing to store or bill, no query
    sampled_at = datetime.fromtimestamp(sample.sampled_at, tz=UTC)
    origin = metering.Origin(sample.boot_id, sample.seq, sampled_at)
    with transaction.atomic():
        # The node's row first, as an ack, a revocation and a stop take it: the stored sample's
        # foreign key is checked at commit (deferred) with a share lock on that row, which would
        # otherwise come after the key rows below and deadlock with an ack that holds the node
        # and waits for them. One node's samples and acks arrive on one connection, in turn,
        # so this lock costs no waiting in the normal course. Read under it, revoked_at is the
        # check the agent connection no longer makes on every frame.
        revoked_at = list(
            Node.objects.select_for_update().filter(pk=node.pk).values_list("revoked_at", flat=True)
        )
        if revoked_at != [None]:
            raise AgentRefused("node revoked", wire.CLOSE_FORBIDDEN)
        keys = _open_keys(node)
        live = [counters for counters in sample.peers if counters.public_key in keys]
        ignored = len(sample.peers) - len(live)
        if ignored:
            log.info("node %s: metering sample names %d key(s) it has no peer for", node, ignored)
        if not live:
            return 0
        body = dict(envelope["body"])  # verified above: the signed object
        signature = str(envelope.get("signature", ""))
        if ignored:
            body["peers"] = [counters.to_dict() for counters in live]
            body["ignored_keys"] = ignored
            signature = ""  # it signed the body with the ignored keys, not this one
        try:
            with transaction.atomic():
                MeteringSample.objects.create(
                    node=node,
                    boot_id=sample.boot_id,
                    seq=sample.seq,
                    sampled_at=sampled_at,
                    body=body,
                    signature=signature,
                )
        except IntegrityError:
            return 0  # already stored: a resend after a lost connection
        per_peer: dict[int, tuple[JobPeer, int, int]] = {}
        moved: dict[int, JobPeerKey] = {}
        for counters in live:
            key = keys[counters.public_key]
            # A fresh key (epoch 0, zero counters) is the same base as "nothing seen yet".
            previous = metering.Counters(key.epoch, key.rx_bytes, key.tx_bytes)
            current = metering.Counters(counters.epoch, counters.rx_bytes, counters.tx_bytes)
            if current.epoch < previous.epoch:
                continue  # a late sample from an older epoch: keep the newer base
            based_on = (
                None
                if key.last_sample_at is None
                else metering.Origin(key.base_boot_id, key.base_seq or 0, key.last_sample_at)
            )
            if metering.stale(previous, based_on, current, origin):
                # Older than the base (out of seq order, or a previous boot's backlog): its lower
                # reading is no restart. Billing nothing for it loses no byte, as the counters
                # are cumulative within the epoch and the base, a later reading, has them all.
                continue
            rx, tx = metering.delta(previous, current)
            # The row is locked (_open_keys): its totals as read are current. A key listed
            # twice in one sample is compared with its own first listing.
            key.epoch = current.epoch
            key.rx_bytes, key.tx_bytes = current.rx_bytes, current.tx_bytes
            key.total_rx_bytes += rx
            key.total_tx_bytes += tx
            key.last_sample_at, key.base_boot_id, key.base_seq = (
                sampled_at,
                sample.boot_id,
                sample.seq,
            )
            moved[key.pk] = key
            _, peer_rx, peer_tx = per_peer.get(key.job_peer_id, (key.job_peer, 0, 0))
            per_peer[key.job_peer_id] = (key.job_peer, peer_rx + rx, peer_tx + tx)
        if moved:
            JobPeerKey.objects.bulk_update(
                list(moved.values()),
                [
                    "epoch",
                    "rx_bytes",
                    "tx_bytes",
                    "total_rx_bytes",
                    "total_tx_bytes",
                    "last_sample_at",
                    "base_boot_id",
                    "base_seq",
                ],
            )
        billed = 0
        for peer, rx, tx in per_peer.values():
            if rx or tx:
                peer_traffic.send(sender=JobPeer, job_peer=peer, rx_bytes=rx, tx_bytes=tx)
                billed += 1
    return billed


def _open_keys(node: Node) -> dict[str, JobPeerKey]:
    """The open keys of `node` by public key, locked in id order (a node has a handful). An
    open key is on one peer of a node only (peer_key_open_once_per_node), and a key closed
    meanwhile by an ack is not taken: the lock re-reads the row."""
    locked = (
        JobPeerKey.objects.select_for_update(of=("self",))
        .filter(job_peer__node=node, closed_at__isnull=True)
        .select_related("job_peer")
        .order_by("pk")
    )
    return {key.public_key: key for key in locked}


def close_keys(keys: Any, at: datetime) -> int:
    """Close the open keys among `keys` (a JobPeerKey queryset) at `at`, locking them in id order
    as ingest_metering does, so the two never wait on each other in a circle."""
    pks = list(
        keys.filter(closed_at__isnull=True)
        .select_for_update(of=("self",))
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not pks:
        return 0
    return JobPeerKey.objects.filter(pk__in=pks, closed_at__isnull=True).update(closed_at=at)


def record_report(node: Node, detail: object) -> None:
    """Keep the agent's last complaint on the node (shown to operators)."""
    text = str(detail or "")[:500]
    log.warning("node %s reports: %s", node.name, text)
    Node.objects.filter(pk=node.pk).update(last_report=text, last_report_at=timezone.now())


def signed_refusal(node_id: str, challenge: str, reason: str) -> dict[str, Any] | None:
    """The gateway's signed refusal of `node_id` on the connection that sent `challenge`
    (wire.Refusal): what lets the agent stop for good. None when `node_id` is not even a node
    id (an agent that claimed garbage gets the bare close code)."""
    try:
        body = wire.Refusal(
            node_id=node_id,
            challenge=challenge,
            reason=reason[:200],
            timestamp=int(time.time()),
        ).to_dict()
    except wire.ProtocolError:
        return None
    return wire.signed_envelope(wire.REFUSAL, body, gateway_identity())
