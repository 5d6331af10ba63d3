"""The isolation table: rendered from desired state, and accepted by the real nft (netns)."""

from __future__ import annotations

import pytest
from clawnode.firewall import render_ruleset

pytestmark = [pytest.mark.unit]


def test_ruleset_lets_job_peers_reach_only_the_node_mesh_address():
    script = render_ruleset("molt0", "10.100.128.5", ["10.100.128.10", "10.100.128.9"])
    assert "elements = { 10.100.128.9, 10.100.128.10 }" in script
    assert 'iifname "molt0" ip saddr @jobs ip daddr != 10.100.128.5 counter drop' in script
    assert 'iifname "molt0" ip saddr @jobs counter drop' in script  # nothing routed onward


def test_ruleset_replaces_the_whole_table_in_one_script():
    script = render_ruleset("molt0", "10.100.128.5", [])
    assert script.startswith("table inet clawnode\ndelete table inet clawnode\n")
    assert "elements" not in script


@pytest.mark.parametrize("name", ["", "a" * 16, 'molt0"; flush ruleset', "molt 0"])
def test_interface_names_that_could_inject_rules_are_refused(name):
    with pytest.raises(ValueError, match="bad interface name"):
        render_ruleset(name, "10.100.128.5", [])


def test_addresses_must_be_ipv4_addresses():
    with pytest.raises(ValueError):
        render_ruleset("molt0", "10.100.128.5", ["10.100.128.9; flush ruleset"])
