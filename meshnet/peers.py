"""Job peers: a buyer's key on a provider node, with a job address of the IP plan's "jobs" block.

Every change bumps the node's desired revision and, after commit, enqueues the push of the signed
desired state (meshnet.tasks.push_desired_state); the agent acknowledges through
meshnet.agent_channel. Lock order, everywhere in meshnet: node row, then pool row (or the node's
peer keys).
"""

from __future__ import annotations

import logging

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.dispatch import receiver
from django.utils import timezone

from meshnet import signals
from meshnet.allocation import allocate_job_address
from meshnet.enqueue import enqueue_on_commit
from meshnet.errors import InvalidPeerKey, MeshError, PeerKeyInUse
from meshnet.hub import hub_public_key
from meshnet.key_claims import KEY_IN_USE, claim_key
from meshnet.keys import check_wireguard_public_key
from meshnet.models import JobPeer, JobPeerKey, Node, PeerKeyClaim
from meshnet.relays import maybe_relay, release_relay
from meshnet.sandboxes import SandboxRequest, add_sandbox, mark_removed
from meshnet.tasks import push_desired_state

log = logging.getLogger(__name__)


def validate_peer_key(public_key: str) -> str:
    """meshnet.keys' check, its message naming the order's field; and the key must not be a
    node's own WireGuard key: WireGuard ignores a peer with the device's own key, so the buyer
    would pay for a tunnel that never comes up (and a node's key is never a buyer's)."""
    try:
        check_wireguard_public_key(public_key)
    except InvalidPeerKey as exc:
        raise InvalidPeerKey(f"wireguard_public_key {exc}") from None
    if Node.objects.filter(wireguard_public_key=public_key).exists():
        raise InvalidPeerKey(
            "wireguard_public_key is a provider node's own key; generate a new key pair"
        )
    # The hub's key is every node's peer already (meshnet.hub): a job peer with it would make
    # the node's desired state name one key twice, which the agent refuses whole.
    if public_key == hub_public_key():
        raise InvalidPeerKey(
            "wireguard_public_key is the gateway's own key; generate a new key pair"
        )
    return public_key


def _bump_revision(node_pk: int) -> None:
    Node.objects.filter(pk=node_pk).update(desired_revision=F("desired_revision") + 1)


def _push_on_commit(node_pk: int) -> None:
    enqueue_on_commit(push_desired_state, node_pk, swept_by="the repush-lagging-nodes beat task")


def bump_and_push(node_pk: int) -> None:
    """A new desired revision for the node (its state changed outside this module: a buyer's
    mapping the hub observed, meshnet.hub) and its push after commit. Call inside the
    transaction that made the change, with the node's row locked."""
    _bump_revision(node_pk)
    _push_on_commit(node_pk)


@receiver(signals.desired_state_changed)
def _desired_state_changed(sender, node_pk: int, **kwargs) -> None:
    bump_and_push(node_pk)


def create_job_peer(
    node: Node,
    public_key: str,
    ref: str,
    *,
    sandbox: SandboxRequest | None = None,
    key_group: str | None = None,
) -> JobPeer:
    """Add a buyer's peer to `node` with a fresh job address from the "jobs" block, and with
    `sandbox`, the job's sandbox (meshnet.sandboxes.add_sandbox: its GPUs and address) in the
    same desired revision, so the agent never sees one without the other.

    Idempotent on `ref` (a retried task returns the same peer and sandbox). Locks: node row,
    then pool rows. Bumps the node's desired revision and pushes the signed state after commit.
    The key becomes the peer's first JobPeerKey. With `key_group` (a multi-node order's
    "cluster:<id>"), the peer shares its key and its tunnel address with the group's other
    peers, one per node: the buyer's one tunnel reaches every node of the group
    (PeerKeyClaim). Raises InvalidPeerKey, PeerKeyInUse (the key is live on a peer of another
    group or on this node already, or retired from one whose node has not yet acknowledged its
    removal), PoolExhausted, NotEnoughGpus; on any error nothing is written. Locks: node row,
    then the key's claim row, then pool rows.
    """
    validate_peer_key(public_key)
    group = key_group or ref
    with transaction.atomic():
        locked = Node.objects.select_for_update().get(pk=node.pk)
        existing = JobPeer.objects.filter(ref=ref).first()
        if existing is not None:
            return existing
        if _key_in_use(public_key, group=group, node_pk=locked.pk):
            raise PeerKeyInUse(KEY_IN_USE)
        claim = claim_key(public_key, group)
        if group == ref:
            lease = allocate_job_address()
        else:
            if claim.allocation_id is None:
                claim.allocation = allocate_job_address()
                claim.save(update_fields=["allocation"])
            lease = claim.allocation
        _bump_revision(locked.pk)
        locked.refresh_from_db(fields=["desired_revision"])
        try:
            with transaction.atomic():
                peer = JobPeer.objects.create(
                    node=locked,
                    public_key=public_key,
                    address=lease.address,
                    # A shared group's lease is the claim's, released with its last peer.
                    allocation=lease if group == ref else None,
                    ref=ref,
                    key_group=group,
                    key_claim=claim,
                    added_revision=locked.desired_revision,
                )
                JobPeerKey.objects.create(
                    job_peer=peer,
                    node=locked,
                    public_key=public_key,
                    active_from=peer.created_at,
                    added_revision=peer.added_revision,
                )
        except IntegrityError:
            raise PeerKeyInUse(KEY_IN_USE) from None
        if sandbox is not None:
            add_sandbox(locked, peer, sandbox)
        maybe_relay(peer, locked)
        _push_on_commit(locked.pk)
        return peer


def _key_in_use(public_key: str, *, group: str, node_pk: int, peer: JobPeer | None = None) -> bool:
    """Whether `public_key` is open on a peer other than `peer` that `group` may not share it
    with: live or open (retired with its final counters still to come, see JobPeerKey) on a
    peer of another group, or on this node at all. The constraints decide races (the claim's
    token, the per-node unique ones); this check only gives the usual case a clear error
    before any write."""
    open_keys = JobPeerKey.objects.filter(public_key=public_key, closed_at__isnull=True)
    live = JobPeer.objects.live().filter(public_key=public_key)
    if peer is not None:
        open_keys = open_keys.exclude(job_peer=peer)
        live = live.exclude(pk=peer.pk)
    elsewhere = Q(node_id=node_pk) | ~Q(key_group=group)
    return (
        open_keys.filter(Q(node_id=node_pk) | ~Q(job_peer__key_group=group)).exists()
        or live.filter(elsewhere).exists()
    )


def remove_job_peer(ref: str) -> JobPeer | None:
    """Drop the peer named `ref`, and its sandbox if it has one, from its node's desired state
    in one revision (removal completes when the agent acknowledges; the sandbox's GPUs and
    address are freed then: see meshnet.sandboxes). Idempotent: a peer already removing or
    removed is left alone."""
    with transaction.atomic():
        peer = JobPeer.objects.filter(ref=ref).first()
        if peer is None:
            return None
        Node.objects.select_for_update().get(pk=peer.node_id)
        peer.refresh_from_db()
        if peer.state in (JobPeer.State.REMOVING, JobPeer.State.REMOVED):
            return peer
        _bump_revision(peer.node_id)
        revision = Node.objects.values_list("desired_revision", flat=True).get(pk=peer.node_id)
        JobPeer.objects.filter(pk=peer.pk).update(
            state=JobPeer.State.REMOVING, removed_revision=revision
        )
        mark_removed(ref, revision)
        release_relay(peer)
        _push_on_commit(peer.node_id)
        peer.refresh_from_db()
        return peer


def replace_peer_key(ref: str, public_key: str) -> JobPeer:
    """Give the live peer named `ref` a new public key (its buyer re-keyed) and keep its job
    address. The node's desired state gets a new revision without the old key and with the new
    one: the agent's reconcile (keyed by public key) removes the old peer and adds the new. The
    peer is `desired` again until the agent acknowledges that revision.

    The old key is retired at that revision, not forgotten: until the agent acknowledges it, the
    node's samples that carry the old key (the periodic ones meanwhile, and the final counters the
    agent sends just before removing it) are still billed to this peer, against the old key's
    own base. The new key gets its own JobPeerKey with a zero base (its counters start at zero,
    under an epoch of its own). Going back to a key of this peer that is retired but not yet
    closed makes it current again, with the base it has.

    Locks: node row, then the peer's keys. Raises InvalidPeerKey, PeerKeyInUse (the key is open
    on another peer) and MeshError when no live peer is named `ref`."""
    validate_peer_key(public_key)
    with transaction.atomic():
        peer = JobPeer.objects.filter(ref=ref).first()
        if peer is None:
            raise MeshError(f"no job peer {ref}")
        Node.objects.select_for_update().get(pk=peer.node_id)
        peer.refresh_from_db()
        if peer.state not in (JobPeer.State.DESIRED, JobPeer.State.ACTIVE):
            raise MeshError(f"job peer {ref} is {peer.state}: it cannot be re-keyed")
        if peer.public_key == public_key:
            return peer
        if peer.key_group != peer.ref:
            # Its key is its group's (every node of a multi-node order has it): one part
            # re-keyed alone would split the buyer's one tunnel.
            raise MeshError(f"job peer {ref} shares its key with its group {peer.key_group}")
        if _key_in_use(public_key, group=peer.key_group, node_pk=peer.node_id, peer=peer):
            raise PeerKeyInUse(KEY_IN_USE)
        claim = claim_key(public_key, peer.key_group)
        revision = _swap_key(peer, public_key, claim)
        peer.refresh_from_db()
        log.info("job peer %s re-keyed at revision %s", ref, revision)
        return peer


def _swap_key(peer: JobPeer, public_key: str, claim: PeerKeyClaim) -> int:
    """`peer` (its node row locked by the caller) takes `public_key` under `claim` at a new
    revision of its node, pushed after commit; returns that revision. The old key is retired at
    it (replace_peer_key says why). PeerKeyInUse when a constraint finds the key open elsewhere."""
    _bump_revision(peer.node_id)
    revision = Node.objects.values_list("desired_revision", flat=True).get(pk=peer.node_id)
    now = timezone.now()
    try:
        with transaction.atomic():
            JobPeer.objects.filter(pk=peer.pk).update(
                public_key=public_key,
                key_claim=claim,
                state=JobPeer.State.DESIRED,
                added_revision=revision,
                acked_at=None,
                # The old key's mapping is not the new key's: the hub observes it afresh.
                observed_endpoint="",
                observed_endpoint_at=None,
            )
            # Retired first: the peer has one current key at every step.
            JobPeerKey.objects.filter(job_peer=peer, retired_at__isnull=True).update(
                retired_at=now, retired_revision=revision
            )
            back = JobPeerKey.objects.filter(
                job_peer=peer, public_key=public_key, closed_at__isnull=True
            ).update(retired_at=None, retired_revision=None, added_revision=revision)
            if not back:
                JobPeerKey.objects.create(
                    job_peer=peer,
                    node_id=peer.node_id,
                    public_key=public_key,
                    active_from=now,
                    added_revision=revision,
                )
    except IntegrityError:
        raise PeerKeyInUse(KEY_IN_USE) from None
    _push_on_commit(peer.node_id)
    return revision


def replace_group_key(group: str, public_key: str) -> list[JobPeer]:
    """Give every live peer of job group `group` (the parts of a multi-node order, which share
    the buyer's one key) the new key `public_key` at once, each at a new revision of its node, as
    replace_peer_key does for one peer. They keep the group's one tunnel address: the old key's
    claim hands its allocation to the new key's, so the buyer's one wg-quick file stays right
    but for its private key. Sending the key the group already has is a no-op.

    Locks: every live peer's node row (pk order), then the claims (meshnet.key_claims). Raises
    InvalidPeerKey, PeerKeyInUse (the key is open on a peer of another group, or on one of
    these nodes), and MeshError when the group has no live peer."""
    validate_peer_key(public_key)
    with transaction.atomic():
        live = JobPeer.objects.filter(
            key_group=group, state__in=[JobPeer.State.DESIRED, JobPeer.State.ACTIVE]
        )
        node_pks = sorted(set(live.values_list("node_id", flat=True)))
        list(Node.objects.select_for_update().filter(pk__in=node_pks).order_by("pk"))
        peers = list(live.select_related("key_claim").order_by("pk"))
        if not peers:
            raise MeshError(f"job group {group} has no live peer to re-key")
        if all(peer.public_key == public_key for peer in peers):
            return peers
        if any(
            _key_in_use(public_key, group=group, node_pk=peer.node_id, peer=peer) for peer in peers
        ):
            raise PeerKeyInUse(KEY_IN_USE)
        claim = claim_key(public_key, group)
        # JobPeer.key_claim points at the claim's token (its key and group).
        old_claims = {peer.key_claim_id for peer in peers if peer.key_claim_id != claim.token}
        moved = (
            PeerKeyClaim.objects.select_for_update()
            .filter(token__in=old_claims, allocation__isnull=False)
            .values_list("allocation_id", flat=True)
            .first()
        )
        if moved is not None and claim.allocation_id is None:
            PeerKeyClaim.objects.filter(allocation_id=moved).update(allocation=None)
            PeerKeyClaim.objects.filter(pk=claim.pk).update(allocation=moved)
            claim.refresh_from_db()
        for peer in peers:
            if peer.public_key != public_key:
                revision = _swap_key(peer, public_key, claim)
                log.info("job peer %s re-keyed with its group at revision %s", peer.ref, revision)
        return [JobPeer.objects.get(pk=peer.pk) for peer in peers]
