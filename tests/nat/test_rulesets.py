"""The NAT kinds as declarative objects: what each renders, and RFC 4787's verdict per pair.

Pure (no namespaces): the nat tier proves with packets that the rendered rulesets behave as
named (test_classify.py); these pin what each kind asks nftables for.
"""

from __future__ import annotations

import itertools

import pytest

from tests.nat import lab as nat_lab

pytestmark = [pytest.mark.unit]

HOSTS = ["192.168.1.2", "192.168.1.3"]


def render(nat: nat_lab.Nat, hosts=HOSTS) -> str:
    return nat.ruleset(
        wan="wan", lan="lan", lan_net="192.168.1.0/24", public_ip="203.0.113.7", hosts=hosts
    )


def test_mapping_is_linux_masquerade_port_preserving_or_fully_random():
    for nat in (nat_lab.FULL_CONE, nat_lab.RESTRICTED_CONE, nat_lab.PORT_RESTRICTED):
        assert 'oifname "wan" masquerade\n' in render(nat)
    assert 'oifname "wan" masquerade fully-random\n' in render(nat_lab.SYMMETRIC)


def test_endpoint_independent_filtering_forwards_any_sender_to_a_used_port():
    rules = render(nat_lab.FULL_CONE)
    assert 'iifname "wan" udp dport @mapped_0 dnat to 192.168.1.2' in rules
    assert 'iifname "wan" udp dport @mapped_1 dnat to 192.168.1.3' in rules
    assert "ip saddr 192.168.1.2 update @mapped_0 { udp sport }" in rules
    assert "contacted" not in rules


def test_address_dependent_filtering_keys_on_the_contacted_address():
    rules = render(nat_lab.RESTRICTED_CONE, hosts=HOSTS[:1])
    assert "type ipv4_addr . inet_service" in rules
    assert "update @contacted_0 { ip daddr . udp sport }" in rules
    assert 'iifname "wan" ip saddr . udp dport @contacted_0 dnat to 192.168.1.2' in rules
    assert "mapped_0" not in rules


@pytest.mark.parametrize("nat", [nat_lab.PORT_RESTRICTED, nat_lab.SYMMETRIC])
def test_address_and_port_dependent_filtering_is_conntrack_alone(nat):
    rules = render(nat)
    assert "dnat to" not in rules
    assert 'iifname "wan" drop' in rules  # nothing new comes in from the WAN


def test_hairpin_sends_inside_packets_to_a_mapping_back_in_from_the_public_address():
    rules = render(nat_lab.HAIRPIN)
    assert 'iifname "lan" ip daddr 203.0.113.7 udp dport @mapped_1 dnat to 192.168.1.3' in rules
    assert 'oifname "lan" ip saddr 192.168.1.0/24 ct status dnat snat to 203.0.113.7' in rules
    plain = render(nat_lab.PORT_RESTRICTED)
    assert 'iifname "lan" ip daddr' not in plain and "snat to" not in plain


def test_nats_in_a_row_behave_as_their_strictest():
    double = nat_lab.KINDS_BY_NAME["double"]
    assert (double.mapping, double.filtering) == (nat_lab.EIM, nat_lab.APDF)
    cone_behind_symmetric = nat_lab.Kind("x", (nat_lab.SYMMETRIC, nat_lab.FULL_CONE))
    assert (cone_behind_symmetric.mapping, cone_behind_symmetric.filtering) == (
        nat_lab.EDM,
        nat_lab.APDF,
    )
    public = nat_lab.KINDS_BY_NAME["public"]
    assert public.public and (public.mapping, public.filtering) == (nat_lab.EIM, nat_lab.EIF)


# RFC 4787's verdict for the lab's kinds: only an endpoint-dependent mapping against a peer whose
# filtering depends on the port (or another endpoint-dependent mapping) cannot go direct.
NEEDS_RELAY = {
    ("symmetric", "symmetric"),
    ("symmetric", "port-restricted"),
    ("symmetric", "double"),
}


@pytest.mark.parametrize(
    ("a", "b"), list(itertools.product(nat_lab.KINDS, repeat=2)), ids=lambda k: k.name
)
def test_direct_possible(a, b):
    expected = (a.name, b.name) not in NEEDS_RELAY and (b.name, a.name) not in NEEDS_RELAY
    assert nat_lab.direct_possible(a, b) is expected
