"""The isolation table, rendered for the whole WireGuard interface."""

from __future__ import annotations

import pytest
from clawnode.firewall import render_ruleset

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
