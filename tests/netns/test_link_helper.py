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
backend.ensure_interface(name, private, 51820, address)
say(step="up", pid=backend.pid)
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
