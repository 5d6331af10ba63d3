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
from meshnet.errors import PoolExhausted, UnknownRegion
from meshnet.models import IpAllocation, IpPool, JobPeer, Node, Sandbox


def _locked_pool(pool_name: str, cidr: str | None = None) -> IpPool:
    """The pool row, locked for this transaction (PostgreSQL; SQLite's IMMEDIATE transactions
    already serialize writers). Pools are created on first use from the IP plan, or from `cidr`
    for pools the plan derives (a node's sandbox /27)."""
    try:
        return IpPool.objects.select_for_update().get(name=pool_name)
    except IpPool.DoesNotExist:
        if cidr is None:
            cidr = ipplan.block(pool_name).cidr
        IpPool.objects.get_or_create(name=pool_name, defaults={"cidr": cidr})
        return IpPool.objects.select_for_update().get(name=pool_name)


def sandbox_pool_name(node_pk: int) -> str:
    """The pool of one node's sandbox addresses (its /27 of the sandbox block)."""
    return f"{ipplan.SANDBOX_BLOCK}:{node_pk}"


def allocate_sandbox_address(node: Node) -> IpAllocation:
    """Lease one address of `node`'s sandbox /27 (ipplan.sandbox_subnet of its mesh address):
    the same O(1) allocation, lock and unique (pool, address) constraint as allocate_address,
    on a pool row of the node's own ("sandboxes:<node pk>"). Raises PoolExhausted (409) when
    all 30 addresses are leased or quarantined."""
    cidr = str(ipplan.sandbox_subnet(node.mesh_address))
    return allocate_address(sandbox_pool_name(node.pk), IpAllocation.Purpose.SANDBOX, cidr=cidr)


def allocate_address(pool_name: str, purpose: str, *, cidr: str | None = None) -> IpAllocation:
    """Lease one address of `pool_name` (created with `cidr` if the IP plan does not name it).

    Locks: the pool row. Fresh offsets are taken in order (O(1)); once the pool's end is
    reached, the released lease with the oldest expired quarantine is reused (one index range
    read). Raises PoolExhausted (409) when neither exists. The unique (pool, address)
    constraint backs the lock: a bug here fails loudly instead of handing out an address twice.
    """
    with transaction.atomic():
        pool = _locked_pool(pool_name, cidr)
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
        # The lease row is reused, and a job peer or sandbox holds its lease one-to-one: the
        # ended one that held it before (its peer removed, its sandbox stopped) keeps its
        # address as history but lets go of the row. Without this the next holder's insert
        # broke the one-to-one constraint once a pool wrapped (a node's 31st sandbox stayed
        # pending for good). Only ended holders are here: a lease is reusable once released.
        # (Node addresses are never released, so no node row is touched under the pool lock.)
        JobPeer.objects.filter(allocation=lease).update(allocation=None)
        Sandbox.objects.filter(allocation=lease).update(allocation=None)
        lease.released_at = None
        lease.reusable_after = None
        lease.allocated_at = now
        lease.purpose = purpose
        lease.save(update_fields=["released_at", "reusable_after", "allocated_at", "purpose"])
        return lease


def _quarantine_seconds(purpose: str) -> int:
    if purpose == IpAllocation.Purpose.SANDBOX:
        return settings.MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS
    if purpose == IpAllocation.Purpose.JOB:
        return settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS
    return settings.MOLT_ADDRESS_QUARANTINE_SECONDS


def allocate_node_address(region: str) -> IpAllocation:
    """Lease a node's mesh address: from its region's block of the IP plan when it declares a
    region, from the MOLT block otherwise. Each block is a pool of its own (same lock, O(1)
    allocation and (pool, address) constraint as allocate_address), so one region running out
    (PoolExhausted naming it, 409) leaves the others and the MOLT block untouched. Raises
    UnknownRegion (400, field "region") for a region the plan does not have."""
    try:
        pool = ipplan.node_pool(region)
    except ipplan.UnknownRegion as exc:
        raise UnknownRegion(str(exc)) from None
    return allocate_address(pool, IpAllocation.Purpose.NODE)


def allocate_job_address() -> IpAllocation:
    """Lease one job tunnel address of the IP plan's "jobs" block (never of the MOLT block the
    nodes enrol from): a full pool raises PoolExhausted("jobs"), which cannot be mistaken for
    the nodes' pool running out."""
    return allocate_address(ipplan.JOB_BLOCK, IpAllocation.Purpose.JOB)


def release_address(lease: IpAllocation) -> None:
    """Return a lease to its pool after the quarantine period of its purpose:
    MOLT_JOB_ADDRESS_QUARANTINE_SECONDS for a job tunnel's, MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS
    for a sandbox's, MOLT_ADDRESS_QUARANTINE_SECONDS for a node's. Releasing twice is a no-op."""
    now = timezone.now()
    quarantine = timedelta(seconds=_quarantine_seconds(lease.purpose))
    IpAllocation.objects.filter(pk=lease.pk, released_at__isnull=True).update(
        released_at=now, reusable_after=now + quarantine
    )
