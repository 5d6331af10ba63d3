"""Inside the vm tier's guest only: a tunnel between the agent's KernelBackend and `wg`.

Two namespaces on the guest's kernel WireGuard: in "prov" the agent's KernelBackend (through the
netns tests' backend driver) creates the interface and the peer; in "peer" a buyer configures
its side with `ip` and `wg` alone. Packets cross both ways; the counters the backend reads
(list_peers and read_peers) are the kernel's, agree with `wg show dump` and mirror the other
side's; removing the peer cuts the traffic.

The host never collects this file (its name does not start with test_); tests/vm/test_vm.py
runs it in the VM, whose kernel has WireGuard.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair

from tests.netns.backend_driver import Driver
from tests.netns.testbed import network_testbed
from tests.vm.guest_plugin import SCALE

pytestmark = [pytest.mark.vm]

PROVIDER_ADDRESS = "10.100.128.1"
PEER_ADDRESS = "10.100.128.9"
PEER_PORT = 51821


def wg_dump(bed: Any, ns: str, iface: str) -> dict[str, dict[str, Any]]:
    """`wg show IFACE dump` as {public key: {endpoint, allowed_ips, handshake, rx, tx}}."""
    lines = bed.exec(ns, "wg", "show", iface, "dump").stdout.strip().splitlines()
    peers = {}
    for line in lines[1:]:
        key, _psk, endpoint, allowed, handshake, rx, tx, _keepalive = line.split("\t")
        peers[key] = {
            "endpoint": endpoint,
            "allowed_ips": allowed.split(","),
            "last_handshake": int(handshake),
            "rx_bytes": int(rx),
            "tx_bytes": int(tx),
        }
    return peers


def test_kernel_backend_carries_a_tunnel_to_a_wg_peer(tmp_path: Path) -> None:
    with network_testbed() as bed:
        prov = bed.namespace("prov")
        prov_ip = bed.attach(prov)
        peer = bed.namespace("peer")
        peer_ip = bed.attach(peer)
        driver = Driver(bed, prov, "kernel")
        try:
            available, why = driver.call("kernel_wireguard_available")
            assert available, why

            identity = Identity.generate()
            iface = bed.wireguard_name("kp")
            driver.call(
                "ensure_interface",
                name=iface,
                private_key=base64.b64encode(identity.wireguard_private_key).decode(),
                listen_port=51820,
                address=f"{PROVIDER_ADDRESS}/17",
            )
            peer_private, peer_public_raw = generate_wireguard_keypair()
            peer_public = encode_key(peer_public_raw)
            key_file = tmp_path / "peer.key"
            key_file.touch(mode=0o600)
            key_file.write_text(encode_key(peer_private) + "\n")
            peer_iface = bed.wireguard_name("kb")
            bed.exec(peer, "ip", "link", "add", peer_iface, "type", "wireguard")
            bed.exec(
                peer,
                "wg",
                "set",
                peer_iface,
                "private-key",
                str(key_file),
                "listen-port",
                str(PEER_PORT),
                "peer",
                identity.wireguard_public_key_b64,
                "endpoint",
                f"{prov_ip}:51820",
                "allowed-ips",
                f"{PROVIDER_ADDRESS}/32",
            )
            bed.exec(peer, "ip", "addr", "add", f"{PEER_ADDRESS}/17", "dev", peer_iface)
            bed.exec(peer, "ip", "link", "set", peer_iface, "up")
            driver.call("set_peer", public_key=peer_public, allowed_ips=[f"{PEER_ADDRESS}/32"])

            ping = bed.exec(peer, "ping", "-c", "3", "-W", "10", PROVIDER_ADDRESS, check=False)
            assert ping.returncode == 0, f"peer -> provider over the tunnel:\n{ping.stdout}"
            ping = bed.exec(prov, "ping", "-c", "2", "-W", "10", PEER_ADDRESS, check=False)
            assert ping.returncode == 0, f"provider -> peer over the tunnel:\n{ping.stdout}"

            # Settle: the peer sends one passive keepalive ten seconds after its last received
            # packet, so counters may move once more; compare only a stable snapshot.
            deadline = time.monotonic() + 60 * SCALE
            while True:
                listed = driver.call("list_peers")
                read = driver.call("read_peers", public_keys=[peer_public, encode_key(b"\1" * 32)])
                kernel = wg_dump(bed, prov, iface)
                theirs = wg_dump(bed, peer, peer_iface)[identity.wireguard_public_key_b64]
                ours = listed[peer_public]
                if (
                    read.get(peer_public) == ours
                    and ours["rx_bytes"] == theirs["tx_bytes"]
                    and ours["tx_bytes"] == theirs["rx_bytes"]
                    and kernel[peer_public]["rx_bytes"] == ours["rx_bytes"]
                    and kernel[peer_public]["tx_bytes"] == ours["tx_bytes"]
                ):
                    break
                assert time.monotonic() < deadline, (
                    f"counters never settled: backend {ours}, read_peers {read}, "
                    f"kernel {kernel.get(peer_public)}, other side {theirs}"
                )
                time.sleep(1)

            assert list(read) == [peer_public]  # an unknown key is not invented
            assert list(listed) == [peer_public]
            assert ours["allowed_ips"] == [f"{PEER_ADDRESS}/32"]
            assert ours["endpoint"] == f"{peer_ip}:{PEER_PORT}" == kernel[peer_public]["endpoint"]
            assert ours["rx_bytes"] > 0 and ours["tx_bytes"] > 0
            assert ours["last_handshake"] == kernel[peer_public]["last_handshake"] > 0

            driver.call("remove_peer", public_key=peer_public)
            assert driver.call("list_peers") == {}
            ping = bed.exec(peer, "ping", "-c", "1", "-W", "3", PROVIDER_ADDRESS, check=False)
            assert ping.returncode != 0, "the removed peer still reaches the provider"

            driver.call("delete_interface")
            assert driver.call("interface_exists") is False
        finally:
            driver.close()
