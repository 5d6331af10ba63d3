"""The IP plan of network.md as validated data, and the address arithmetic allocation uses."""

from __future__ import annotations

import ipaddress

import pytest

from meshnet import ipplan
from meshnet.ipplan import PLAN, Block, PlanError, validate_plan

pytestmark = [pytest.mark.unit]


def _with(*blocks: Block, without: str | None = None) -> tuple[Block, ...]:
    """PLAN with `blocks` replacing same-named ones (or appended) and `without` dropped."""
    replaced = {b.name: b for b in blocks}
    plan = [replaced.pop(b.name, b) for b in PLAN if b.name != without]
    return (*plan, *replaced.values())


def test_the_plan_of_network_md_is_valid():
    validate_plan(PLAN)


def test_the_plan_has_the_blocks_network_md_names():
    cidrs = {b.name: b.cidr for b in PLAN}
    assert cidrs["control"] == "10.100.0.0/24"
    assert cidrs["molt"] == "10.100.128.0/17"
    assert cidrs["workload"] == "10.200.0.0/16"
    assert cidrs["jobs"] == "10.64.0.0/11"
    assert [cidrs[r] for r in ipplan.REGIONS] == [
        "10.100.16.0/20",
        "10.100.32.0/20",
        "10.100.48.0/20",
        "10.100.64.0/20",
    ]
    assert ipplan.GATEWAY_HUB_ADDRESS in ipplan.block("control").network


def test_the_sketchs_misaligned_block_is_refused_by_name():
    bad = Block("us-west", "10.100.2.0/20", "region us-west", "mesh")
    with pytest.raises(PlanError, match=r"'us-west' 10\.100\.2\.0/20 is not a valid network"):
        validate_plan(_with(bad))


def test_overlapping_siblings_are_refused_naming_both():
    # The aligned reading of the sketch's 10.100.2.0/20 is 10.100.0.0/20: it swallows control.
    bad = Block("us-west", "10.100.0.0/20", "region us-west", "mesh")
    with pytest.raises(PlanError, match="overlap") as err:
        validate_plan(_with(bad))
    assert "'control'" in str(err.value) and "'us-west'" in str(err.value)


def test_a_wide_block_covering_several_siblings_is_refused():
    bad = Block("spare-1", "10.100.64.0/18", "spare", "mesh")
    with pytest.raises(PlanError, match="overlap"):
        validate_plan(_with(bad))


def test_a_child_outside_its_parent_is_refused():
    bad = Block("asia", "10.101.64.0/20", "region asia", "mesh")
    with pytest.raises(PlanError, match=r"'asia' 10\.101\.64\.0/20 is outside its parent"):
        validate_plan(_with(bad))


def test_an_unknown_parent_and_a_duplicate_name_are_refused():
    with pytest.raises(PlanError, match="unknown parent 'nowhere'"):
        validate_plan(_with(Block("x", "10.100.1.0/25", "x", "nowhere"), without="reserved"))
    with pytest.raises(PlanError, match="defined twice"):
        validate_plan((*PLAN, PLAN[1]))


@pytest.mark.parametrize("cidr", ["10.100.128.0/17", "10.100.0.0/24", "10.100.200.0/29"])
def test_network_and_broadcast_addresses_are_never_handed_out(cidr):
    net = ipaddress.IPv4Network(cidr)
    first, last = ipplan.first_offset(net), ipplan.last_offset(net)
    assert ipplan.address_at(net, first) == net.network_address + 1
    assert ipplan.address_at(net, last) == net.broadcast_address - 1
    for offset in (0, net.num_addresses - 1, -1, net.num_addresses):
        with pytest.raises(ValueError, match="outside the usable hosts"):
            ipplan.address_at(net, offset)
    every = {ipplan.address_at(net, o) for o in range(first, last + 1)}
    assert len(every) == ipplan.usable_count(net) == net.num_addresses - 2
    assert net.network_address not in every and net.broadcast_address not in every


@pytest.mark.parametrize("block", PLAN, ids=[b.name for b in PLAN])
def test_no_block_of_the_plan_hands_out_its_network_or_broadcast_address(block):
    # Allocation walks offsets first_offset..last_offset (meshnet.allocation.allocate_address).
    net = block.network
    first, last = ipplan.first_offset(net), ipplan.last_offset(net)
    assert (first, last) == (1, net.num_addresses - 2)
    assert ipplan.address_at(net, first) == net.network_address + 1
    assert ipplan.address_at(net, last) == net.broadcast_address - 1
    for offset in (first - 1, last + 1):  # the network and the broadcast address
        with pytest.raises(ValueError, match="outside the usable hosts"):
            ipplan.address_at(net, offset)


def test_the_molt_pool_has_32766_usable_addresses():
    molt = ipaddress.IPv4Network("10.100.128.0/17")
    assert ipplan.usable_count(molt) == 32766
    assert ipplan.usable_count(ipplan.block(ipplan.MOLT_POOL).network) == 32766
    assert ipplan.usable_count(ipaddress.IPv4Network("10.100.16.0/20")) == 4094
    assert ipplan.usable_count(ipaddress.IPv4Network("10.100.0.0/24")) == 254


def test_the_jobs_block_holds_a_day_of_24_hour_jobs_at_20_starts_a_second(settings):
    # Issue 10: the market sustains 20 job starts a second for a day. In steady state a pool
    # holds rate x (job length + quarantine) leases; 24 h jobs are the longest the day holds.
    jobs = ipplan.block(ipplan.JOB_BLOCK)
    needed = 20 * (86_400 + settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS)
    assert ipplan.usable_count(jobs.network) == 2_097_150
    assert needed <= ipplan.usable_count(jobs.network)
    # ...which the nodes' /17 never could: the reason jobs have a block of their own.
    assert needed > ipplan.usable_count(ipplan.block(ipplan.MOLT_POOL).network)


def test_the_jobs_block_is_outside_the_mesh_the_molt_block_and_the_sandboxes():
    jobs = ipplan.block(ipplan.JOB_BLOCK)
    assert jobs.parent is None
    for other in ("mesh", ipplan.MOLT_POOL, ipplan.SANDBOX_BLOCK, ipplan.WORKLOAD_POOL):
        assert not jobs.network.overlaps(ipplan.block(other).network), other


def test_a_jobs_block_overlapping_the_sandboxes_is_refused_naming_both():
    bad = Block(ipplan.JOB_BLOCK, "10.128.0.0/11", "jobs", None)
    with pytest.raises(PlanError, match="overlap") as err:
        validate_plan(_with(bad))
    assert "'jobs'" in str(err.value) and "'sandboxes'" in str(err.value)


def test_offset_of_is_the_inverse_of_address_at_and_refuses_outsiders():
    net = ipaddress.IPv4Network("10.100.128.0/17")
    for offset in (1, 255, 256, 32766):
        assert ipplan.offset_of(net, ipplan.address_at(net, offset)) == offset
    assert ipplan.address_at(net, 32766) == ipaddress.IPv4Address("10.100.255.254")
    with pytest.raises(ValueError, match="is not in"):
        ipplan.offset_of(net, "10.100.127.255")


def test_workload_subnets_are_one_slash_24_per_node_within_bounds():
    assert ipplan.workload_subnet(0, 256) == ipaddress.IPv4Network("10.200.0.0/24")
    assert ipplan.workload_subnet(7, 256) == ipaddress.IPv4Network("10.200.7.0/24")
    assert ipplan.workload_subnet(255, 256) == ipaddress.IPv4Network("10.200.255.0/24")
    workload = ipplan.block(ipplan.WORKLOAD_POOL).network
    assert all(ipplan.workload_subnet(n, 256).subnet_of(workload) for n in (0, 128, 255))


@pytest.mark.parametrize(
    ("index", "max_nodes", "highest"),
    [(-1, 256, 255), (256, 256, 255), (256, 1000, 255), (4, 4, 3)],
)
def test_workload_subnet_refuses_indexes_beyond_the_configured_limit(index, max_nodes, highest):
    # The refusal names the highest index allowed: the configured limit, and never past the
    # pool's 256 /24s however high the limit is set.
    with pytest.raises(ValueError) as refused:
        ipplan.workload_subnet(index, max_nodes)
    assert str(refused.value) == f"workload node index {index} is outside 0..{highest}"


def test_an_unknown_block_is_a_key_error_naming_it():
    with pytest.raises(KeyError) as missing:
        ipplan.block("no-such-block")
    assert missing.value.args == ("no-such-block",)


@pytest.mark.parametrize(
    ("mesh_address", "subnet"),
    [
        ("10.100.128.0", "10.128.0.0/27"),
        ("10.100.128.1", "10.128.0.32/27"),
        ("10.100.128.2", "10.128.0.64/27"),
        ("10.100.129.0", "10.128.32.0/27"),
        ("10.100.255.255", "10.143.255.224/27"),
    ],
)
def test_each_node_gets_the_sandbox_slash_27_of_its_offset_in_the_molt_block(mesh_address, subnet):
    # The node at offset k of the MOLT /17 gets the k-th /27 of the sandbox /12: the last one
    # ends where the /12 does, so no two nodes share one and none falls outside.
    assert ipplan.sandbox_subnet(mesh_address) == ipaddress.IPv4Network(subnet)
    assert ipplan.sandbox_subnet(mesh_address).subnet_of(ipplan.block(ipplan.SANDBOX_BLOCK).network)


# -- regions ------------------------------------------------------------------------------------


def test_each_region_a_node_may_declare_is_a_block_of_the_mesh_it_allocates_from():
    mesh = ipplan.mesh_network()
    assert str(mesh) == "10.100.0.0/16"
    for region in ipplan.REGIONS:
        assert ipplan.node_pool(region) == region
        assert ipplan.block(region).parent == "mesh"
        assert ipplan.block(region).network.subnet_of(mesh)
    # No region declared: the MOLT block, as before regions were used.
    assert ipplan.node_pool("") == ipplan.MOLT_POOL


@pytest.mark.parametrize("name", ["mars", "spare-1", "molt", "control", "EU-WEST"])
def test_a_region_the_plan_does_not_offer_is_refused_naming_the_choices(name):
    with pytest.raises(ipplan.UnknownRegion, match="one of us-west, us-east, eu-west, asia"):
        ipplan.node_pool(name)


def test_a_region_that_is_no_block_of_the_mesh_stops_the_plan(monkeypatch):
    monkeypatch.setattr(ipplan, "REGIONS", (*ipplan.REGIONS, "mars"))
    with pytest.raises(PlanError, match="'mars'"):
        validate_plan(PLAN)


def test_node_region_names_the_block_an_address_is_in():
    assert ipplan.node_region("10.100.48.1") == "eu-west"
    assert ipplan.node_region("10.100.79.254") == "asia"
    assert ipplan.node_region("10.100.128.1") == ""  # the MOLT block: no region


def test_every_node_address_of_every_block_has_its_own_sandbox_subnet():
    """MOLT nodes keep their /27 of 10.128.0.0/12 (existing nodes' sandboxes do not move); nodes
    of a region block get theirs from 10.144.0.0/12 by their offset in the mesh's lower /17, so
    no two nodes of any block share a sandbox address."""
    assert str(ipplan.sandbox_subnet("10.100.128.1")) == "10.128.0.32/27"
    assert str(ipplan.sandbox_subnet("10.100.16.1")) == "10.146.0.32/27"
    region_sandboxes = ipplan.block(ipplan.REGION_SANDBOX_BLOCK).network
    seen: set[ipaddress.IPv4Network] = set()
    for name in (*ipplan.REGIONS, ipplan.MOLT_POOL):
        network = ipplan.block(name).network
        for offset in (1, 2, ipplan.last_offset(network)):
            subnet = ipplan.sandbox_subnet(ipplan.address_at(network, offset))
            assert subnet.prefixlen == ipplan.SANDBOX_SUBNET_PREFIX
            assert subnet not in seen
            seen.add(subnet)
            if name != ipplan.MOLT_POOL:
                assert subnet.subnet_of(region_sandboxes)
    assert not region_sandboxes.overlaps(ipplan.block(ipplan.SANDBOX_BLOCK).network)


@pytest.mark.parametrize("address", ["10.100.0.1", "10.100.1.9", "10.100.80.1", "10.64.0.1"])
def test_addresses_of_no_node_block_have_no_sandbox_subnet(address):
    # The hub, the reserved and spare blocks and the jobs block hold no node.
    with pytest.raises(ValueError, match="not a node address"):
        ipplan.sandbox_subnet(address)
