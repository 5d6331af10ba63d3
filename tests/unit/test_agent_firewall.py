"""The isolation table, rendered for the whole WireGuard interface."""

from __future__ import annotations

import pytest
from clawnode.firewall import SandboxRule, render_ruleset

pytestmark = [pytest.mark.unit]


def test_ruleset_lets_tunnel_traffic_reach_only_the_node_mesh_address():
    script = render_ruleset("molt0", "10.100.128.5")
    assert 'iifname "molt0" ip daddr != 10.100.128.5 counter drop' in script
    assert 'iifname "molt0" meta nfproto ipv6 counter drop' in script


def test_ruleset_routes_nothing_from_or_onto_the_tunnel():
    script = render_ruleset("molt0", "10.100.128.5")
    assert 'iifname "molt0" counter drop' in script  # not to other jobs, the LAN, the internet
    assert 'oifname "molt0" counter drop' in script


def test_ruleset_replaces_the_whole_table_in_one_script():
    script = render_ruleset("molt0", "10.100.128.5")
    assert script.startswith("table inet clawnode\ndelete table inet clawnode\n")


@pytest.mark.parametrize("name", ["", "a" * 16, 'molt0"; flush ruleset', "molt 0"])
def test_interface_names_that_could_inject_rules_are_refused(name):
    with pytest.raises(ValueError, match="bad interface name"):
        render_ruleset(name, "10.100.128.5")


def test_mesh_address_must_be_an_ipv4_address():
    with pytest.raises(ValueError):
        render_ruleset("molt0", "10.100.128.5; flush ruleset")


# -- job sandboxes -----------------------------------------------------------------------------

A = SandboxRule("msbx0123456789a", "10.128.0.33/32", "10.100.200.7/32", True)
B = SandboxRule("msbx0123456789b", "10.128.0.34/32", "10.100.200.8/32", False)


def rules_of(script: str, chain: str) -> list[str]:
    """The rule lines of `chain`, in order."""
    body = script.split(f"\tchain {chain} {{\n", 1)[1].split("\t}\n", 1)[0]
    return [line.strip() for line in body.splitlines()[1:]]


def test_a_job_peer_reaches_only_its_own_sandbox():
    script = render_ruleset("molt0", "10.100.128.5", [A, B])
    assert (
        "set pairs { type ipv4_addr . ipv4_addr; "
        "elements = { 10.100.200.7 . 10.128.0.33, 10.100.200.8 . 10.128.0.34 }; }"
    ) in script
    forward = rules_of(script, "forward")
    allow = 'iifname "molt0" oifname "msbx*" ip saddr . ip daddr @pairs accept'
    # The pair is the only way from the tunnel to a sandbox: everything else from it is dropped
    # after, and nothing from the tunnel is accepted before.
    assert forward.index(allow) < forward.index('iifname "molt0" counter drop')
    assert next(rule for rule in forward if rule.startswith('iifname "molt0"')) == allow


def test_a_peer_with_a_sandbox_reaches_nothing_of_the_host_and_one_without_the_mesh_address():
    script = render_ruleset("molt0", "10.100.128.5", [A, B])
    assert "set sandboxed { type ipv4_addr; elements = { 10.100.200.7, 10.100.200.8 }; }" in script
    input_ = rules_of(script, "input")
    sandboxed = input_.index('iifname "molt0" ip saddr @sandboxed counter drop')
    # Transitional: a job listed without a sandbox keeps today's rule.
    assert input_.index('iifname "molt0" ip daddr != 10.100.128.5 counter drop') > sandboxed


def test_only_echo_replies_to_the_hosts_own_pings_come_in_from_a_sandboxed_peer():
    input_ = rules_of(render_ruleset("molt0", "10.100.128.5", [A, B]), "input")
    pings = (
        'iifname "molt0" ip saddr @sandboxed ip daddr 10.100.128.5 icmp type echo-reply '
        "ct state established accept"
    )
    # The one accept for a sandboxed peer's packets to the host, just before their drop: an
    # echo reply conntrack ties to the host's request (clawnode.rtt), to the mesh address.
    assert input_.index(pings) + 1 == input_.index(
        'iifname "molt0" ip saddr @sandboxed counter drop'
    )
    assert [rule for rule in input_ if "@sandboxed" in rule and "accept" in rule] == [pings]


def test_a_sandbox_reaches_the_host_only_with_replies_to_the_hosts_own_connections():
    input_ = rules_of(render_ruleset("molt0", "10.100.128.5", [A]), "input")
    assert input_[:2] == [
        'iifname "msbx*" ct state established,related accept',
        'iifname "msbx*" counter drop',
    ]


def test_sandboxes_reach_no_other_sandbox_no_lan_and_the_internet_only_with_egress():
    script = render_ruleset("molt0", "10.100.128.5", [A, B])
    assert "set egress { type ipv4_addr; elements = { 10.128.0.33 }; }" in script
    forward = rules_of(script, "forward")
    assert 'oifname "msbx*" counter drop' in forward  # into a sandbox: nothing but the above
    assert forward.index('oifname "msbx*" counter drop') < forward.index(
        'iifname "msbx*" ip daddr @private counter drop'
    )
    assert forward[-2:] == [
        'iifname "msbx*" ip daddr @private counter drop',
        'iifname "msbx*" ip saddr != @egress counter drop',
    ]
    for network in ("10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12", "169.254.0.0/16"):
        assert network in script.split("set private", 1)[1].split("}", 1)[0]
    # Replies come back to a sandbox with egress only; only such a sandbox is masqueraded.
    assert 'oifname "msbx*" ip daddr @egress ct state established,related accept' in forward
    assert rules_of(script, "postrouting") == [
        'oifname != "msbx*" oifname != "molt0" ip saddr @egress masquerade'
    ]


def test_a_sandbox_speaks_only_from_its_own_address_and_only_ipv4():
    script = render_ruleset("molt0", "10.100.128.5", [A, B])
    assert (
        'set owned { type ifname . ipv4_addr; elements = { "msbx0123456789a" . 10.128.0.33, '
        '"msbx0123456789b" . 10.128.0.34 }; }'
    ) in script
    forward = rules_of(script, "forward")
    assert forward[:3] == [
        'iifname "msbx*" meta nfproto ipv6 counter drop',
        'oifname "msbx*" meta nfproto ipv6 counter drop',
        'iifname "msbx*" iifname . ip saddr != @owned counter drop',
    ]


def test_replies_from_a_sandbox_go_only_to_its_own_peer():
    forward = rules_of(render_ruleset("molt0", "10.100.128.5", [A]), "forward")
    reply = 'iifname "msbx*" oifname "molt0" ct state established ip daddr . ip saddr @pairs accept'
    assert forward.index(reply) < forward.index('oifname "molt0" counter drop')


def test_without_sandboxes_the_sets_are_empty_and_the_table_still_whole():
    script = render_ruleset("molt0", "10.100.128.5")
    assert "set pairs { type ipv4_addr . ipv4_addr; }" in script
    assert "set egress { type ipv4_addr; }" in script
    assert script.startswith("table inet clawnode\ndelete table inet clawnode\n")
    assert script.count("table inet clawnode {") == 1  # one transaction, one table


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (SandboxRule('msbx1"; flush', "10.128.0.33/32", "10.100.200.7/32", True), "veth"),
        (SandboxRule("eth0", "10.128.0.33/32", "10.100.200.7/32", True), "veth"),
        (SandboxRule("msbx0123456789a", "10.128.0.33; flush", "10.100.200.7/32", True), "address"),
        (SandboxRule("msbx0123456789a", "10.128.0.33/32", "fe80::1", True), "peer_address"),
    ],
)
def test_sandbox_rules_that_could_inject_or_mislead_are_refused_by_field(rule, field):
    with pytest.raises(ValueError, match=rf"sandboxes\[0\]\.{field}"):
        render_ruleset("molt0", "10.100.128.5", [rule])


def test_the_wireguard_interface_may_not_take_the_sandbox_prefix():
    with pytest.raises(ValueError, match="prefix"):
        render_ruleset("msbx0", "10.100.128.5")


def test_the_order_of_sandboxes_does_not_change_the_table():
    assert render_ruleset("molt0", "10.100.128.5", [A, B]) == render_ruleset(
        "molt0", "10.100.128.5", [B, A]
    )
