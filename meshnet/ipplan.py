"""The IP plan of network.md as validated data, and pure address arithmetic.

The plan is checked at start-up (MeshnetConfig.ready): every block aligned (no host bits set),
inside its parent, and no two siblings overlapping. A bad plan stops the gateway from starting
rather than handing out addresses from the wrong place.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass

MESH_BLOCK = "mesh"
MOLT_POOL = "molt"
# Job tunnel addresses (a buyer's /32 on its order's node) have a block of their own, so the
# market's job starts never eat the addresses nodes enrol with, and a full pool names which of
# the two it is ("jobs" or "molt"). Sizing (docs/ip-plan.md): 20 starts a second for a day of
# 24 h jobs is 20 x (86,400 + quarantine) = about 1.73 million live leases; a /11 holds 2,097,150.
JOB_BLOCK = "jobs"
WORKLOAD_POOL = "workload"
SANDBOX_BLOCK = "sandboxes"
# Each node's sandboxes get one /27 of SANDBOX_BLOCK, found from the node's offset in the MOLT
# block, so every node the MOLT block can hold has one and no two nodes share one
# (docs/ip-plan.md).
SANDBOX_SUBNET_PREFIX = 27
# Nodes of a region block (the mesh's lower /17: control, reserved, regions, spares) get their
# sandbox /27 from a second /12 in the same way, by their offset in that /17 (docs/ip-plan.md).
REGION_SANDBOX_BLOCK = "region-sandboxes"


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Block:
    name: str
    cidr: str
    purpose: str
    parent: str | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)


PLAN: tuple[Block, ...] = (
    Block("mesh", "10.100.0.0/16", "the mesh"),
    Block("control", "10.100.0.0/24", "gateway / control plane (10.100.0.1 = hub)", "mesh"),
    Block("reserved", "10.100.1.0/24", "reserved", "mesh"),
    Block("us-west", "10.100.16.0/20", "region us-west", "mesh"),
    Block("us-east", "10.100.32.0/20", "region us-east", "mesh"),
    Block("eu-west", "10.100.48.0/20", "region eu-west", "mesh"),
    Block("asia", "10.100.64.0/20", "region asia", "mesh"),
    Block("spare-1", "10.100.80.0/20", "spare region", "mesh"),
    Block("spare-2", "10.100.96.0/20", "spare region", "mesh"),
    Block("spare-3", "10.100.112.0/20", "spare region", "mesh"),
    Block(MOLT_POOL, "10.100.128.0/17", "marketplace: provider nodes", "mesh"),
    Block(WORKLOAD_POOL, "10.200.0.0/16", "workload subnets, one /24 per cluster node"),
    Block(SANDBOX_BLOCK, "10.128.0.0/12", "job sandboxes: one /27 per MOLT node"),
    Block(REGION_SANDBOX_BLOCK, "10.144.0.0/12", "job sandboxes: one /27 per region node"),
    Block(JOB_BLOCK, "10.64.0.0/11", "job tunnels: one buyer address (/32) per live job"),
)

# The regions a provider may declare for a node (`clawnode join --region`): each is a block of
# the plan, and a node that declares one gets its address there (node_pool). Listings carry
# their node's region.
REGIONS: tuple[str, ...] = ("us-west", "us-east", "eu-west", "asia")
GATEWAY_HUB_ADDRESS = ipaddress.IPv4Address("10.100.0.1")


def validate_plan(plan: tuple[Block, ...] = PLAN) -> None:
    """Raise PlanError naming the first block that is misaligned, outside or overlapping."""
    by_name: dict[str, Block] = {}
    for block in plan:
        if block.name in by_name:
            raise PlanError(f"block {block.name!r} is defined twice")
        try:
            ipaddress.IPv4Network(block.cidr, strict=True)
        except ValueError as exc:
            raise PlanError(
                f"block {block.name!r} {block.cidr} is not a valid network: {exc}"
            ) from None
        by_name[block.name] = block
    for block in plan:
        if block.parent is None:
            continue
        parent = by_name.get(block.parent)
        if parent is None:
            raise PlanError(f"block {block.name!r} names unknown parent {block.parent!r}")
        if not block.network.subnet_of(parent.network):
            raise PlanError(
                f"block {block.name!r} {block.cidr} is outside its parent {parent.cidr}"
            )
    for region in REGIONS:
        if region not in by_name or by_name[region].parent != MESH_BLOCK:
            raise PlanError(f"region {region!r} is not a block of the mesh")
    siblings: dict[str | None, list[Block]] = {}
    for block in plan:
        siblings.setdefault(block.parent, []).append(block)
    for group in siblings.values():
        ordered = sorted(group, key=lambda b: int(b.network.network_address))
        for left, right in itertools.pairwise(ordered):
            if left.network.overlaps(right.network):
                raise PlanError(
                    f"blocks {left.name!r} {left.cidr} and {right.name!r} {right.cidr} overlap"
                )


def block(name: str) -> Block:
    for candidate in PLAN:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


class UnknownRegion(ValueError):
    pass


def node_pool(region: str) -> str:
    """The pool a node's mesh address comes from: its region's block when it declares one, the
    MOLT block otherwise. Raises UnknownRegion for a name that is not one of REGIONS."""
    if not region:
        return MOLT_POOL
    if region not in REGIONS:
        raise UnknownRegion(f"unknown region {region!r}; one of {', '.join(REGIONS)}")
    return region


def node_region(mesh_address: str | ipaddress.IPv4Address) -> str:
    """The region whose block holds `mesh_address`, "" for the MOLT block (or anywhere else)."""
    addr = ipaddress.IPv4Address(mesh_address)
    for region in REGIONS:
        if addr in block(region).network:
            return region
    return ""


def mesh_network() -> ipaddress.IPv4Network:
    """The whole mesh (every node block, the hub's control block): what an agent puts on-link
    on its WireGuard interface, so a node reaches the hub and nodes of every region."""
    return block(MESH_BLOCK).network


def first_offset(network: ipaddress.IPv4Network) -> int:
    """Offset of the first usable host (the network address is never handed out)."""
    return 1


def last_offset(network: ipaddress.IPv4Network) -> int:
    """Offset of the last usable host (the broadcast address is never handed out)."""
    return network.num_addresses - 2


def usable_count(network: ipaddress.IPv4Network) -> int:
    return last_offset(network) - first_offset(network) + 1


def address_at(network: ipaddress.IPv4Network, offset: int) -> ipaddress.IPv4Address:
    if not first_offset(network) <= offset <= last_offset(network):
        raise ValueError(f"offset {offset} is outside the usable hosts of {network}")
    return network.network_address + offset


def offset_of(network: ipaddress.IPv4Network, address: str | ipaddress.IPv4Address) -> int:
    addr = ipaddress.IPv4Address(address)
    if addr not in network:
        raise ValueError(f"{addr} is not in {network}")
    return int(addr) - int(network.network_address)


def workload_subnet(node_index: int, max_nodes: int) -> ipaddress.IPv4Network:
    """The /24 of the workload pool for cluster node `node_index` (10.200.{n}.0/24)."""
    if not 0 <= node_index < max_nodes or node_index > 255:
        raise ValueError(
            f"workload node index {node_index} is outside 0..{min(max_nodes, 256) - 1}"
        )
    base = block(WORKLOAD_POOL).network.network_address
    return ipaddress.IPv4Network(f"{base + node_index * 256}/24")


def sandbox_subnet(mesh_address: str | ipaddress.IPv4Address) -> ipaddress.IPv4Network:
    """The /27 of the sandbox blocks for the node whose mesh address is `mesh_address`: the
    node at offset k of the MOLT block gets the k-th /27 of the sandbox block (10.128.0.0 + 32k);
    2**15 offsets times 32 addresses fill the /12 exactly, so the plan covers every node the MOLT
    block holds. A node of a region block, at offset k of the mesh's lower /17 (which holds
    every region block), gets the k-th /27 of the region sandbox block (10.144.0.0 + 32k) the
    same way."""
    addr = ipaddress.IPv4Address(mesh_address)
    molt = block(MOLT_POOL).network
    if addr in molt:
        offset, sandboxes = offset_of(molt, addr), block(SANDBOX_BLOCK)
    else:
        lower = next(mesh_network().subnets(new_prefix=molt.prefixlen))
        if addr not in lower or not node_region(addr):
            raise ValueError(f"{addr} is not a node address of the MOLT or a region block")
        offset, sandboxes = offset_of(lower, addr), block(REGION_SANDBOX_BLOCK)
    size = 2 ** (32 - SANDBOX_SUBNET_PREFIX)
    base = sandboxes.network.network_address + offset * size
    return ipaddress.IPv4Network(f"{base}/{SANDBOX_SUBNET_PREFIX}")
