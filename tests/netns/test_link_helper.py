"""The userspace backend configures its link through pyroute2 in a child process, so the
long-lived agent never imports pyroute2 (about 8 MB of its memory), and the child's failures
reach the agent as WireGuardError with their errno. Real wireguard-go, real netlink, in a
network namespace of its own."""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys

import pytest
from clawnode.keys import Identity

from tests.netns import testbed as netns_testbed

pytestmark = [pytest.mark.netns]

# Runs inside the namespace: one line of JSON per step, then waits for the test to go on.
AGENT_SIDE = """
import base64, json, sys
from clawnode.backends import links
from clawnode.backends.errors import WireGuardError
from clawnode.backends.userspace import UserspaceBackend

name, private, address = sys.argv[1], base64.b64decode(sys.argv[2]), sys.argv[3]

def say(**fields):
    fields["pyroute2_imported"] = any(m.split(".")[0] == "pyroute2" for m in sys.modules)
    print(json.dumps(fields), flush=True)

backend = UserspaceBackend()
backend.ensure_interface(name, private, 51820, address, routes=("10.64.0.0/11",))
say(step="up", pid=backend.pid)
sys.stdin.readline()
# Enrolled again with another job block: the old route goes, the new one comes.
backend.ensure_interface(name, private, 51820, address, routes=("10.80.0.0/12",))
say(step="rerouted", routes=links.in_child("routes", name))
sys.stdin.readline()
try:
    links.in_child("configure", "nosuch0", "10.0.0.1/24")
except WireGuardError as exc:
    say(step="error", message=str(exc), errno=exc.errno)
backend.delete_interface()
say(step="deleted", exists=backend.interface_exists())
"""


@pytest.fixture
def bed():
    testbed = netns_testbed.Testbed()
    try:
        yield testbed
    finally:
        testbed.down()


def test_userspace_backend_sets_up_its_link_without_importing_pyroute2(bed):
    ns = bed.namespace("lnk")
    name = bed.wireguard_name("lnk")
    identity = Identity.generate()
    private = base64.b64encode(identity.wireguard_private_key).decode()
    agent = bed.popen(
        ns,
        [sys.executable, "-c", AGENT_SIDE, name, private, "10.100.128.1/17"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert agent.stdin is not None and agent.stdout is not None

    up = json.loads(agent.stdout.readline() or "{}")
    assert up.get("step") == "up", up
    shown = bed.exec(ns, "ip", "-o", "addr", "show", "dev", name).stdout
    assert "inet 10.100.128.1/17" in shown
    assert "UP" in bed.exec(ns, "ip", "link", "show", name).stdout
    assert bed.exec(ns, "wg", "show", name, "public-key").stdout.strip() == (
        identity.wireguard_public_key_b64
    )
    assert up["pyroute2_imported"] is False
    # The job block is routed onto the interface (job addresses are not on-link with the node's),
    # marked as the agent's; the kernel's own prefix route of the /17 is left alone.
    routes = bed.exec(ns, "ip", "-o", "route", "show", "dev", name).stdout
    assert "10.64.0.0/11 proto static scope link" in routes, routes
    assert "10.100.128.0/17 proto kernel" in routes, routes
    assert "dev " + name in bed.exec(ns, "ip", "route", "get", "10.64.3.7").stdout

    agent.stdin.write("go on\n")
    agent.stdin.flush()
    rerouted = json.loads(agent.stdout.readline() or "{}")
    assert rerouted == {"step": "rerouted", "routes": ["10.80.0.0/12"], "pyroute2_imported": False}
    routes = bed.exec(ns, "ip", "-o", "route", "show", "dev", name).stdout
    assert "10.64.0.0/11" not in routes and "10.80.0.0/12 proto static" in routes, routes
    assert "10.100.128.0/17 proto kernel" in routes, routes

    agent.stdin.write("go on\n")
    agent.stdin.flush()
    failed = json.loads(agent.stdout.readline() or "{}")
    assert failed.get("step") == "error", failed
    assert failed["errno"] == errno.ENODEV
    assert "interface nosuch0 does not exist" in failed["message"]

    deleted = json.loads(agent.stdout.readline() or "{}")
    assert deleted == {"step": "deleted", "exists": False, "pyroute2_imported": False}
    assert bed.exec(ns, "ip", "link", "show", name, check=False).returncode != 0
    assert agent.wait(timeout=30) == 0


MESH_ROUTES_SIDE = """
import json, sys
from clawnode.backends.userspace import UserspaceBackend
from clawnode.keys import Identity
from clawnode.state import Enrollment

name, address, mesh_network = sys.argv[1], sys.argv[2], sys.argv[3]
identity = Identity.generate()
enrollment = Enrollment(
    gateway="http://127.0.0.1:8000", node_id=identity.node_id, name="node-1",
    mesh_address=address, gateway_public_key=identity.public_key_b64,
    websocket_url="ws://127.0.0.1:8000/ws/agent/", interface=name, mesh_network=mesh_network,
)
backend = UserspaceBackend()
# What the daemon's bring_up does with an enrolment.
backend.ensure_interface(
    name, identity.wireguard_private_key, 51820, enrollment.interface_address,
    routes=enrollment.routes,
)
print(json.dumps({"address": enrollment.interface_address, "routes": enrollment.routes}))
sys.stdout.flush()
sys.stdin.readline()
backend.delete_interface()
"""


@pytest.mark.parametrize(
    ("address", "mesh_network"),
    [
        ("10.100.48.1", "10.100.0.0/16"),  # a region node, from a gateway that uses regions
        ("10.100.128.1", "10.100.128.0/17"),  # a molt node enrolled before regions were used
    ],
)
def test_the_hub_and_nodes_of_every_block_are_routed_into_the_tunnel(bed, address, mesh_network):
    """Whatever block the node's address is in and whatever mesh_network its enrolment saved,
    the hub (10.100.0.1), nodes of the region blocks and of the molt block, and the job block
    all route onto its WireGuard interface: never out by the default route."""
    ns = bed.namespace("rte")
    name = bed.wireguard_name("rte")
    agent = bed.popen(
        ns,
        [sys.executable, "-c", MESH_ROUTES_SIDE, name, address, mesh_network],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert agent.stdin is not None and agent.stdout is not None
    up = json.loads(agent.stdout.readline() or "{}")
    assert up.get("address", "").startswith(address + "/"), up
    # A default route out of the namespace, as a provider machine has: without the mesh routes
    # these destinations would leave by it.
    bed.exec(ns, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    bed.exec(ns, "ip", "addr", "add", "198.51.100.9/24", "dev", "up0")
    bed.exec(ns, "ip", "link", "set", "up0", "up")
    bed.exec(ns, "ip", "link", "set", "up1", "up")
    bed.exec(ns, "ip", "route", "add", "default", "via", "198.51.100.1")

    for destination in ("10.100.0.1", "10.100.16.7", "10.100.64.7", "10.100.200.7", "10.64.3.7"):
        shown = bed.exec(ns, "ip", "route", "get", destination).stdout
        assert f"dev {name}" in shown, (destination, shown)
    # Outside the mesh and the job block: the default route, as before.
    assert "dev up0" in bed.exec(ns, "ip", "route", "get", "10.200.0.7").stdout

    agent.stdin.write("done\n")
    agent.stdin.flush()
    assert agent.wait(timeout=30) == 0
