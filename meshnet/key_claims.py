"""Claims of buyers' WireGuard keys (meshnet.models.PeerKeyClaim): which job group a key is
live in, and a shared group's one tunnel address. meshnet.peers claims a key when it adds or
re-keys a peer; whatever moves peers to `removed` (the agent's acknowledgement, a silent
node's clean-up, a revocation) clears their key_claim in the same update and calls
release_unclaimed. Lock order: after the node row, before pool rows (meshnet.peers).
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, transaction

from meshnet.allocation import release_address
from meshnet.errors import PeerKeyInUse
from meshnet.models import IpAllocation, JobPeer, PeerKeyClaim

KEY_IN_USE = "this WireGuard public key is already in use on another peer"


def claim_key(public_key: str, group: str) -> PeerKeyClaim:
    """The key's claim for `group`, locked: created, or taken over from a group no live peer
    of which holds the key any more (its shared address released then). PeerKeyInUse when a
    live peer of another group holds it; the claim's row lock serialises a take-over with
    every new holder (each takes that lock first), and its unique key decides two creations:
    the loser reads the winner's claim (two parts of one group provisioned at once share it)."""
    claim = PeerKeyClaim.objects.select_for_update().filter(public_key=public_key).first()
    token = PeerKeyClaim.token_for(public_key, group)
    if claim is None:
        try:
            with transaction.atomic():
                return PeerKeyClaim.objects.create(public_key=public_key, group=group, token=token)
        except IntegrityError:
            # The unique index waited for the other creation to commit: it is readable now.
            claim = PeerKeyClaim.objects.select_for_update().filter(public_key=public_key).first()
            if claim is None:
                raise PeerKeyInUse(KEY_IN_USE) from None
    if claim.group == group:
        return claim
    if JobPeer.objects.filter(key_claim=claim).exists():
        raise PeerKeyInUse(KEY_IN_USE)
    if claim.allocation_id is not None:
        release_address(claim.allocation)
    claim.group, claim.token, claim.allocation = group, token, None
    claim.save(update_fields=["group", "token", "allocation"])
    return claim


def release_unclaimed(tokens: Iterable[str]) -> None:
    """Call after peers holding these claims went `removed` (their key_claim cleared in the
    same update): a shared group's tunnel address is released once no live peer holds its
    claim. A single job's peer holds its own lease, released by the caller. Each claim's row
    is locked before its holders are counted: a part of the group being added on another
    node holds that lock until it commits, and is counted then."""
    claims = (
        PeerKeyClaim.objects.select_for_update()
        .filter(token__in=set(tokens) - {None}, allocation__isnull=False)
        .order_by("pk")
    )
    for claim in claims:
        if JobPeer.objects.filter(key_claim=claim).exists():
            continue
        lease = IpAllocation.objects.get(pk=claim.allocation_id)
        PeerKeyClaim.objects.filter(pk=claim.pk).update(allocation=None)
        release_address(lease)
