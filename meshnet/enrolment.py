"""Enrolment: one-time tokens, a node's signed registration (its nonce remembered once), and its
GPU list as the agent reports it.

Locks: enroll_node takes the token row, then (through allocate_address) the pool row.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from clawnode import wire
from clawnode.keys import InvalidKey, encode_key, node_id_for, x25519_public_from_ed25519
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Subquery
from django.utils import timezone

from meshnet import ipplan
from meshnet.allocation import allocate_node_address
from meshnet.errors import EnrollmentRefused, UnknownRegion
from meshnet.models import EnrollmentToken, Gpu, Node, UsedNonce
from meshnet.signals import node_changed
from meshnet.versions import version_key

log = logging.getLogger(__name__)

ENROLLMENT_TOKEN_PREFIX = "molt_enr_"  # noqa: S105  (a prefix, not a secret)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once; only its hash is stored
    record: EnrollmentToken


def create_enrollment_token(owner) -> IssuedToken:
    """A one-time enrolment token for `owner`, valid MOLT_ENROLLMENT_TOKEN_TTL_SECONDS."""
    token = ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = timezone.now()
    record = EnrollmentToken.objects.create(
        owner=owner,
        token_hash=_hash_token(token),
        hint=token[: len(ENROLLMENT_TOKEN_PREFIX) + 4],
        created_at=now,
        expires_at=now + timedelta(seconds=settings.MOLT_ENROLLMENT_TOKEN_TTL_SECONDS),
    )
    return IssuedToken(token=token, record=record)


def _remember_nonce(kind: str, nonce: str) -> None:
    """Refuse a second use of a nonce; the unique constraint decides races. One statement,
    INSERT .. ON CONFLICT DO NOTHING RETURNING (PostgreSQL, SQLite 3.35+): no savepoint to
    catch an IntegrityError in, and a racing copy waits for the first one's commit and then
    inserts nothing."""
    table = connection.ops.quote_name(UsedNonce._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (kind, nonce, seen_at) VALUES (%s, %s, %s) "  # noqa: S608
            "ON CONFLICT (kind, nonce) DO NOTHING RETURNING id",
            [kind, nonce, connection.ops.adapt_datetimefield_value(timezone.now())],
        )
        if cursor.fetchone() is None:
            raise EnrollmentRefused("replayed request: this nonce was already used")


def replace_gpus(node: Node, gpus: tuple[wire.GpuInfo, ...], *, fresh: bool = False) -> None:
    """Make `gpus` the node's GPU rows (at enrolment, and when an inventory report differs).
    Raises EnrollmentRefused for simulated GPUs unless MOLT_ALLOW_SIMULATED_GPUS. Call inside
    the transaction that created or locked the node's row; `fresh`: the node was just
    inserted, so it has no rows to delete."""
    if any(gpu.simulated for gpu in gpus) and not settings.MOLT_ALLOW_SIMULATED_GPUS:
        raise EnrollmentRefused("simulated GPUs are not accepted by this gateway")
    if not fresh:
        node.gpus.all().delete()
    Gpu.objects.bulk_create(
        Gpu(
            node=node,
            index=gpu.index,
            name=gpu.name,
            memory_mb=gpu.memory_mb,
            uuid=gpu.uuid,
            driver_version=gpu.driver_version,
            cuda_version=gpu.cuda_version,
            driver_version_key=version_key(gpu.driver_version),
            cuda_version_key=version_key(gpu.cuda_version),
            simulated=gpu.simulated,
        )
        for gpu in gpus
    )


@dataclass(frozen=True)
class Enrolment:
    node: Node
    created: bool


def enroll_node(envelope: Mapping[str, Any], *, observed_ip: str | None) -> Enrolment:
    """Register a node from a signed enrolment request (proof of possession of its identity).

    Checks, in order: well-formed body, signature by the identity key in the body, timestamp
    within MOLT_ENROLLMENT_MAX_SKEW_SECONDS, WireGuard key equal to the identity's X25519
    conversion, nonce never seen (replay), token valid, unused and unexpired. A retry of the same
    identity with the token it already used returns the same node (a lost response is safe to
    retry). One transaction: token consumed, mesh address leased (from the declared region's
    block, else the MOLT block; UnknownRegion, 400, for a region the plan lacks), node and GPUs
    written.
    """
    body = envelope.get("body") if isinstance(envelope, Mapping) else None
    if not isinstance(body, Mapping):
        raise EnrollmentRefused("request must be a signed envelope with a 'body' object")
    try:
        request = wire.EnrollRequest.from_dict(body)
    except (wire.ProtocolError, InvalidKey) as exc:
        err = EnrollmentRefused(f"invalid enrolment request: {exc}")
        err.status_code = 400
        raise err from None
    identity_key = base64.b64decode(request.identity_public_key)
    try:
        wire.open_envelope(envelope, identity_key, wire.ENROLL)
    except (wire.BadSignature, wire.ProtocolError) as exc:
        raise EnrollmentRefused(f"signature refused: {exc}") from None
    try:
        wire.check_fresh(
            request.timestamp,
            int(timezone.now().timestamp()),
            max_skew=settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS,
        )
    except wire.StaleMessage as exc:
        raise EnrollmentRefused(f"stale request: {exc}") from None
    if encode_key(x25519_public_from_ed25519(identity_key)) != request.wireguard_public_key:
        raise EnrollmentRefused(
            "wireguard_public_key is not the X25519 conversion of the identity key"
        )
    try:
        # Checked before the token is touched: a provider who mistyped the region runs join
        # again with the same token.
        ipplan.node_pool(request.region)
    except ipplan.UnknownRegion as exc:
        raise UnknownRegion(str(exc)) from None

    with transaction.atomic():
        _remember_nonce(wire.ENROLL, request.nonce)
        token = (
            EnrollmentToken.objects.select_for_update(of=("self",))
            .filter(token_hash=_hash_token(request.token))
            .select_related("node")
            # Whether this identity is enrolled already, in the same round trip.
            .annotate(
                enrolled_id=Subquery(
                    Node.objects.filter(identity_public_key=request.identity_public_key).values(
                        "pk"
                    )[:1]
                )
            )
            .first()
        )
        if token is None:
            raise EnrollmentRefused("unknown enrolment token")
        if token.used_at is not None:
            if (
                token.node is not None
                and token.node.identity_public_key == request.identity_public_key
            ):
                return Enrolment(node=token.node, created=False)
            raise EnrollmentRefused("enrolment token was already used")
        if token.expires_at <= timezone.now():
            raise EnrollmentRefused("enrolment token has expired; create a new one")
        if token.enrolled_id is not None:
            existing = Node.objects.get(pk=token.enrolled_id)
            if existing.owner_id != token.owner_id or existing.revoked_at is not None:
                raise EnrollmentRefused("this identity is enrolled to another account or revoked")
            EnrollmentToken.objects.filter(pk=token.pk).update(used_at=timezone.now())
            return Enrolment(node=existing, created=False)

        # The region is the node's for life: its address is in that region's block (the MOLT
        # block without one), and its listings carry it. A re-join returns the node as it is.
        lease = allocate_node_address(request.region)
        node = Node.objects.create(
            owner_id=token.owner_id,
            node_id=node_id_for(identity_key),
            name=f"pending-{secrets.token_hex(6)}",
            identity_public_key=request.identity_public_key,
            wireguard_public_key=request.wireguard_public_key,
            mesh_address=lease.address,
            allocation=lease,
            hostname=request.hostname,
            listen_port=request.listen_port,
            declared_endpoint=request.endpoint,
            observed_ip=observed_ip,
            region=request.region,
        )
        # The name comes from the primary key, which exists only after the insert.
        node.name = f"node-{node.pk}"
        node.save(update_fields=["name"])
        replace_gpus(node, request.gpus, fresh=True)
        token.used_at = timezone.now()
        token.node = node
        token.save(update_fields=["used_at", "node"])
        node_changed.send(sender=Node, node=node, change="enrolled")
    log.info("node %s enrolled at %s for user %s", node.name, node.mesh_address, node.owner_id)
    return Enrolment(node=node, created=True)


def websocket_url(base_url: str) -> str:
    """ws(s)://host/ws/agent/ for a gateway reached at base_url (http or https)."""
    if base_url.startswith("https://"):
        return "wss://" + base_url.removeprefix("https://").rstrip("/") + "/ws/agent/"
    return "ws://" + base_url.removeprefix("http://").rstrip("/") + "/ws/agent/"
