"""What a killed `make run` leaves of its real demo nodes (scripts/demo_nodes.py SIGKILLed before
its clean-up: namespaces with wireguard-go still serving in them, the bridge, the DNAT table,
UAPI sockets) is removed at the next start (run_dev.remove_demo_leftovers), but never while
another make run's nodes hold the lock."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.conftest import REPO
from tests.integration.conftest import wait_until
from tests.netns.testbed import Testbed, run

pytestmark = [pytest.mark.netns]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def what_is_left(demo_nodes) -> list[str]:
    found = [
        line.split()[0]
        for line in run("ip", "netns", "list").stdout.splitlines()
        if line.startswith(demo_nodes.NETNS_PREFIX)
    ]
    if run("ip", "link", "show", demo_nodes.BRIDGE, check=False).returncode == 0:
        found.append(demo_nodes.BRIDGE)
    if demo_nodes.NFT_TABLE in run("nft", "list", "tables").stdout:
        found.append(demo_nodes.NFT_TABLE)
    found += [f"wireguard-go {pid}" for pid in demo_nodes._leftover_wireguard_go()]
    found += [str(path) for path in demo_nodes.UAPI_DIR.glob("mdemo*.sock")]
    return found


def test_a_killed_runs_demo_nodes_are_removed_at_the_next_start(tmp_path):
    run_dev = load("run_dev")  # puts scripts/ on sys.path for demo_nodes
    import demo_nodes

    assert not what_is_left(demo_nodes), "a make run's real demo nodes are up here"
    nodes = [
        demo_nodes.RealNode(name, tmp_path / name, f"198.18.0.{host}", 24, "198.18.0.1", iface)
        for name, host, iface in (("left-a", 11, "mdemo1"), ("left-b", 12, "mdemo2"))
    ]
    # What demo_nodes.main builds, then its wireguard-go processes, and no clean-up at all:
    # the state a kill -9 leaves.
    bed = demo_nodes.Testbed(suffix="", net="198.18.0", bridge_name=demo_nodes.BRIDGE)
    demo_nodes.build_network(bed, nodes, ("127.0.0.1", 8000))
    for node in nodes:
        run("ip", "netns", "exec", node.namespace, "wireguard-go", node.interface)
    try:
        left = what_is_left(demo_nodes)
        assert len([item for item in left if item.startswith("wireguard-go")]) == 2, left
        assert "molt-demo-left-a" in left and demo_nodes.NFT_TABLE in left, left

        # Another make run's nodes hold the lock: nothing of theirs is touched.
        held = demo_nodes.hold_lock()
        try:
            run_dev.remove_demo_leftovers()
            assert what_is_left(demo_nodes) == left
        finally:
            os.close(held)

        run_dev.remove_demo_leftovers()
        wait_until(lambda: not what_is_left(demo_nodes), timeout=10, message="all removed")
    finally:
        Testbed(
            suffix="",
            namespaces=[node.namespace for node in nodes],
            links=[demo_nodes.BRIDGE],
            wireguard_interfaces=[node.interface for node in nodes],
        ).down()
        run("nft", "delete", "table", "ip", "molt_demo", check=False)
