"""KernelBackend in a fresh network namespace, following what the running kernel can do.

These machines' kernels have no WireGuard (design/testing.md): there the backend must refuse
clearly and leave nothing behind, and `auto` must not pick it. On a kernel with WireGuard the
same test drives the real netlink path: interface, peers one at a time, update in place,
removal, deletion.
"""

from __future__ import annotations

import base64
import os
import time

import pytest
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair

from tests.netns import testbed as netns_testbed
from tests.netns.backend_driver import Driver, DriverError

pytestmark = [pytest.mark.netns]


def key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


@pytest.fixture
def bed():
    testbed = netns_testbed.Testbed()
    try:
        yield testbed
    finally:
        testbed.down()


def test_kernel_backend_does_what_the_running_kernel_supports(bed):
    name = f"mk{os.getpid() % 10000}k"
    ns = bed.namespace("kern")
    driver = Driver(bed, ns, "kernel")
    identity = Identity.generate()
    private = base64.b64encode(identity.wireguard_private_key).decode()
    try:
        available, why = driver.call("kernel_wireguard_available")
        if not available:
            with pytest.raises(DriverError) as info:
                driver.call(
                    "ensure_interface",
                    name=name,
                    private_key=private,
                    listen_port=51820,
                    address="10.100.128.1/17",
                )
            assert info.value.kind == "WireGuardError"
            assert f"cannot create {name}: the kernel has no WireGuard" in info.value.message
            assert why in info.value.message
            assert driver.call("interface_exists") is False
            assert bed.exec(ns, "ip", "link", "show", name, check=False).returncode != 0
            return

        driver.call(
            "ensure_interface",
            name=name,
            private_key=private,
            listen_port=51820,
            address="10.100.128.1/17",
            routes=["10.64.0.0/11"],
        )
        assert "10.100.128.1/17" in bed.exec(ns, "ip", "-o", "addr", "show", "dev", name).stdout
        # The job block is routed onto the interface (job addresses are not on-link).
        routes = bed.exec(ns, "ip", "-o", "route", "show", "dev", name).stdout
        assert "10.64.0.0/11 proto static scope link" in routes, routes
        assert bed.exec(ns, "wg", "show", name, "public-key").stdout.strip() == (
            identity.wireguard_public_key_b64
        )
        one, two = key(), key()
        driver.call("set_peer", public_key=one, allowed_ips=["10.100.128.9/32"])
        driver.call(
            "set_peer",
            public_key=two,
            allowed_ips=["10.100.128.10/32"],
            endpoint="198.51.100.77:51820",
            keepalive=25,
        )
        peers = driver.call("list_peers")
        assert peers[one]["allowed_ips"] == ["10.100.128.9/32"]
        assert peers[two]["endpoint"] == "198.51.100.77:51820"
        assert peers[two]["persistent_keepalive"] == 25
        driver.call("set_peer", public_key=one, allowed_ips=["10.100.128.9/32", "10.200.5.0/24"])
        assert driver.call("list_peers")[one]["allowed_ips"] == [
            "10.100.128.9/32",
            "10.200.5.0/24",
        ]
        # A peer no longer desired is cut off first (no allowed IPs, no keepalive), kept with
        # its counters until they are read, then removed.
        desired = {
            "node_id": identity.node_id,
            "revision": 1,
            "peers": [
                {
                    "public_key": one,
                    "allowed_ips": ["10.100.128.9/32", "10.200.5.0/24"],
                    "kind": "job",
                    "ref": "order-1",
                    "endpoint": "",
                    "persistent_keepalive": 0,
                }
            ],
            "issued_at": int(time.time()),
        }
        assert driver.call("reconcile", desired=desired) == {
            "actions": ["Retire"],
            "results": {two: "ok"},
        }
        cut = driver.call("list_peers")[two]
        assert (cut["allowed_ips"], cut["persistent_keepalive"]) == ([], 0)
        assert f"{two}\t(none)" in bed.exec(ns, "wg", "show", name, "allowed-ips").stdout
        assert driver.call("reconcile", desired=desired) == {"actions": [], "results": {}}
        driver.call("remove_peer", public_key=two)
        assert list(driver.call("list_peers")) == [one]
        driver.call("delete_interface")
        assert driver.call("interface_exists") is False
    finally:
        driver.close()
