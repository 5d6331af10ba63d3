"""Leasing addresses of the IP plan's pools (see meshnet.ipplan): one lease per node or job.

Lock order, everywhere in meshnet: node row, then pool row. Allocation holds the pool row lock
only for the insert of one lease.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from meshnet import ipplan
from meshnet.errors import PoolExhausted
from meshnet.models import IpAllocation, IpPool


def _locked_pool(pool_name: str) -> IpPool:
    """The pool row, locked for this transaction (PostgreSQL; SQLite's IMMEDIATE transactions
    already serialize writers). Pools are created on first use from the IP plan."""
    try:
        return IpPool.objects.select_for_update().get(name=pool_name)
    except IpPool.DoesNotExist:
        cidr = ipplan.block(pool_name).cidr
        IpPool.objects.get_or_create(name=pool_name, defaults={"cidr": cidr})
        return IpPool.objects.select_for_update().get(name=pool_name)


def allocate_address(pool_name: str, purpose: str) -> IpAllocation:
    """Lease one address of `pool_name`.

    Locks: the pool row. Fresh offsets are taken in order (O(1)); once the pool's end is
    reached, the released lease with the oldest expired quarantine is reused (one index range
    read). Raises PoolExhausted (409) when neither exists. The unique (pool, address)
    constraint backs the lock: a bug here fails loudly instead of handing out an address twice.
    """
    with transaction.atomic():
        pool = _locked_pool(pool_name)
        network = pool.network
        if pool.next_offset <= ipplan.last_offset(network):
            address = ipplan.address_at(network, pool.next_offset)
            lease = IpAllocation.objects.create(pool=pool, address=str(address), purpose=purpose)
            IpPool.objects.filter(pk=pool.pk).update(next_offset=F("next_offset") + 1)
            return lease
        now = timezone.now()
        lease = (
            IpAllocation.objects.select_for_update()
            .filter(pool=pool, reusable_after__lte=now)
            .order_by("reusable_after", "id")
            .first()
        )
        if lease is None:
            raise PoolExhausted(pool.name)
        lease.released_at = None
        lease.reusable_after = None
        lease.allocated_at = now
        lease.purpose = purpose
        lease.save(update_fields=["released_at", "reusable_after", "allocated_at", "purpose"])
        return lease


def release_address(lease: IpAllocation) -> None:
    """Return a lease to its pool after the quarantine period. Releasing twice is a no-op."""
    now = timezone.now()
    quarantine = timedelta(seconds=settings.MOLT_ADDRESS_QUARANTINE_SECONDS)
    IpAllocation.objects.filter(pk=lease.pk, released_at__isnull=True).update(
        released_at=now, reusable_after=now + quarantine
    )
