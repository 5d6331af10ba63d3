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


@pytest.mark.parametrize(("index", "max_nodes"), [(-1, 256), (256, 256), (256, 1000), (4, 4)])
def test_workload_subnet_refuses_indexes_beyond_the_configured_limit(index, max_nodes):
    with pytest.raises(ValueError, match=r"outside 0\.\."):
        ipplan.workload_subnet(index, max_nodes)
