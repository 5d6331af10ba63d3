"""The names a sandbox's network goes by, and its pyroute2 child's error path (nothing here
touches the kernel: tests/netns/test_sandbox_isolation.py makes real namespaces)."""

from __future__ import annotations

import clawnode.sandbox.network as network
import pytest
from clawnode.firewall import SANDBOX_VETH_PREFIX
from clawnode.sandbox.network import (
    HOST_VETH_PREFIX,
    NetnsSandboxNetwork,
    SandboxNetworkError,
    host_veth,
    in_child,
    netns_name,
    ref_of_netns,
)

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize("ref", ["order:42", "order:1", "job:a.b_c", "x"])
def test_a_namespace_name_leads_back_to_its_ref(ref):
    name = netns_name(ref)
    assert name.startswith("molt-") and ":" not in name
    assert ref_of_netns(name) == ref


def test_the_namespace_of_an_order_reads_plainly():
    assert netns_name("order:42") == "molt-order-42"


@pytest.mark.parametrize("ref", ["", "order-42", "order:4/2", "a" * 65, "order 42", "../x"])
def test_refs_that_would_not_map_back_or_are_unsafe_are_refused(ref):
    with pytest.raises(SandboxNetworkError, match="ref"):
        netns_name(ref)


@pytest.mark.parametrize("name", ["molt0", "cni-1234", "molt-", "molt-a/b", "other-order-1"])
def test_namespaces_that_are_not_a_sandboxs_are_left_alone(name):
    assert ref_of_netns(name) is None


def test_host_veth_names_fit_a_link_name_and_carry_the_firewalls_prefix():
    names = {host_veth(f"order:{n}") for n in range(2000)}
    assert len(names) == 2000
    assert all(len(name) == 15 and name.startswith(HOST_VETH_PREFIX) for name in names)
    assert HOST_VETH_PREFIX == SANDBOX_VETH_PREFIX
    assert host_veth("order:42") == host_veth("order:42")


def test_present_lists_the_refs_of_sandbox_namespaces_only(tmp_path, monkeypatch):
    for name in ("molt-order-1", "molt-order-22", "cni-abc", "mprov123"):
        (tmp_path / name).touch()
    monkeypatch.setattr(network, "NETNS_DIR", tmp_path)
    assert NetnsSandboxNetwork().present() == {"order:1", "order:22"}
    monkeypatch.setattr(network, "NETNS_DIR", tmp_path / "missing")
    assert NetnsSandboxNetwork().present() == set()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("order:1", "10.128.0.33/24", "10.100.200.7/32", True), "must be a /32"),
        (("order:1", "10.128.0.33/32", "nowhere", True), "not an IPv4 address"),
        (("order-1", "10.128.0.33/32", "10.100.200.7/32", True), "ref"),
    ],
)
def test_a_bad_spec_fails_before_anything_is_made(args, message):
    with pytest.raises(SandboxNetworkError, match=message):
        NetnsSandboxNetwork().setup(*args)


def test_the_childs_refusal_reaches_the_agent_as_its_error():
    # The child checks again (it may be run by hand): a refusal comes back as one JSON line.
    with pytest.raises(SandboxNetworkError, match="must be a /32"):
        in_child("setup", "order:1", "10.128.0.33/24")


def test_the_child_refuses_an_unknown_operation():
    with pytest.raises(ValueError, match="unknown"):
        in_child("flush")
    assert network.main(["flush"]) == 2
