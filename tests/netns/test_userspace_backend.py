"""UserspaceBackend against real wireguard-go in network namespaces (design/testing.md).

A provider namespace runs the backend (through tests/netns/backend_driver.py); a buyer namespace
runs its own wireguard-go configured with wireguard-tools' `wg` and a key from `wg genkey`. The
two are joined by a veth on 203.0.113.0/24. Packets cross the tunnel and WireGuard's counters
are read back through the backend. Everything is removed afterwards, also on failure.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair
from clawnode.state import Enrollment, StateDir

from tests.netns import testbed as netns_testbed
from tests.netns.backend_driver import Driver, DriverError

pytestmark = [pytest.mark.netns]

SOCKET_DIR = Path("/var/run/wireguard")
CLAWNODE = str(Path(sys.executable).parent / "clawnode")
PROVIDER_MESH = "10.100.128.1"
BUYER_JOB = "10.100.128.9"
LISTEN_PORT = 51820
ECHO_PORT = 7007

ECHO_SERVER = f"""
import socket, threading
srv = socket.create_server(("0.0.0.0", {ECHO_PORT}))
print("ready", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

ECHO_CLIENT = f"""
import socket, sys
payload = bytes(range(256)) * 256  # 64 KiB
with socket.create_connection(("{PROVIDER_MESH}", {ECHO_PORT}), timeout=10) as s:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
sys.exit(0 if got == payload else 1)
"""


HELD_UDP_PORT = 7007
UDP_HOLDER = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {HELD_UDP_PORT}))
print("ready", flush=True)
time.sleep(600)
"""


def hold_until_ready(bed: netns_testbed.Testbed, ns: str, source: str) -> None:
    """Start a helper process in `ns` (stopped by the testbed) and wait for its "ready"."""
    proc = bed.popen(ns, [sys.executable, "-c", source], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"


def wg_pubkey(private: str) -> str:
    return subprocess.run(
        ["wg", "pubkey"], input=private + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()


def key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_pid(pid: int) -> None:
    if not pid_exists(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_exists(pid):
        os.kill(pid, signal.SIGKILL)


def pid_exists(pid: int) -> bool:
    """Alive, not a zombie (a zombie nobody reaps has exited all the same)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


@pytest.fixture
def bed():
    testbed = netns_testbed.Testbed()
    try:
        yield testbed
    finally:
        testbed.down()


def test_userspace_backend_manages_peers_one_by_one_and_counts_real_traffic(bed, tmp_path):
    suffix = os.getpid() % 10000
    prov_if, buyer_if = f"mt{suffix}p", f"mt{suffix}b"  # unique: the UAPI socket dir is shared
    prov = bed.namespace("prov")
    buyer = bed.namespace("buyer")
    bed.link(prov, "203.0.113.1/24", buyer, "203.0.113.2/24", tag="u")
    driver = Driver(bed, prov, "userspace")
    provider = Identity.generate()
    wg_go_pid = None
    try:
        # -- the interface: created once, adopted on a second call ---------------------------
        driver.call(
            "ensure_interface",
            name=prov_if,
            private_key=base64.b64encode(provider.wireguard_private_key).decode(),
            listen_port=LISTEN_PORT,
            address=f"{PROVIDER_MESH}/17",
        )
        wg_go_pid = driver.call("pid")
        assert wg_go_pid and pid_exists(wg_go_pid)
        assert (SOCKET_DIR / f"{prov_if}.sock").exists()
        shown = bed.exec(prov, "ip", "-o", "addr", "show", "dev", prov_if).stdout
        assert f"inet {PROVIDER_MESH}/17" in shown
        assert "UP" in bed.exec(prov, "ip", "link", "show", prov_if).stdout
        # wireguard-tools reading the same device agrees on the key and port we set.
        assert bed.exec(prov, "wg", "show", prov_if, "public-key").stdout.strip() == (
            provider.wireguard_public_key_b64
        )
        assert bed.exec(prov, "wg", "show", prov_if, "listen-port").stdout.strip() == "51820"
        driver.call(
            "ensure_interface",
            name=prov_if,
            private_key=base64.b64encode(provider.wireguard_private_key).decode(),
            listen_port=LISTEN_PORT,
            address=f"{PROVIDER_MESH}/17",
        )
        assert driver.call("pid") == wg_go_pid  # no second wireguard-go
        assert driver.call("list_peers") == {}

        # -- the buyer: its own wireguard-go, configured with wg and ip ---------------------
        buyer_private = bed.exec(buyer, "wg", "genkey").stdout.strip()
        key_file = tmp_path / "buyer.key"
        key_file.write_text(buyer_private + "\n")
        key_file.chmod(0o600)
        buyer_public = wg_pubkey(buyer_private)
        bed.popen(
            buyer,
            ["wireguard-go", buyer_if],
            env={**os.environ, "WG_PROCESS_FOREGROUND": "1"},
        )
        wait_for(lambda: (SOCKET_DIR / f"{buyer_if}.sock").exists(), 10, "buyer's wireguard-go")
        bed.exec(
            buyer, "wg", "set", buyer_if, "private-key", str(key_file),
            "peer", provider.wireguard_public_key_b64,
            "allowed-ips", "10.100.128.0/17",
            "endpoint", f"203.0.113.1:{LISTEN_PORT}",
        )  # fmt: skip
        bed.exec(buyer, "ip", "addr", "add", f"{BUYER_JOB}/17", "dev", buyer_if)
        bed.exec(buyer, "ip", "link", "set", buyer_if, "up")

        # -- two peers, set one at a time ----------------------------------------------------
        other = key()
        driver.call("set_peer", public_key=buyer_public, allowed_ips=[f"{BUYER_JOB}/32"])
        driver.call(
            "set_peer",
            public_key=other,
            allowed_ips=["10.100.128.10/32"],
            endpoint="198.51.100.77:51820",
            keepalive=25,
        )
        peers = driver.call("list_peers")
        assert sorted(peers) == sorted([buyer_public, other])
        assert peers[buyer_public]["allowed_ips"] == [f"{BUYER_JOB}/32"]
        assert peers[other]["allowed_ips"] == ["10.100.128.10/32"]
        assert peers[other]["endpoint"] == "198.51.100.77:51820"
        assert peers[other]["persistent_keepalive"] == 25
        allowed = bed.exec(prov, "wg", "show", prov_if, "allowed-ips").stdout
        assert f"{buyer_public}\t{BUYER_JOB}/32" in allowed
        assert f"{other}\t10.100.128.10/32" in allowed

        # -- real traffic through the tunnel is counted ------------------------------------
        hold_until_ready(bed, prov, ECHO_SERVER)
        result = bed.exec(buyer, sys.executable, "-c", ECHO_CLIENT, check=False, timeout=60)
        assert result.returncode == 0, result.stderr
        counted = driver.call("list_peers")[buyer_public]
        assert counted["rx_bytes"] > 64 * 1024 and counted["tx_bytes"] > 64 * 1024
        assert time.time() - 120 < counted["last_handshake"] <= time.time() + 1
        assert counted["endpoint"] == "203.0.113.2:" + counted["endpoint"].rsplit(":", 1)[1]
        # The last counters of a peer about to be removed come from the reply's raw bytes, only
        # that peer's part parsed: the same peer as the full parse, counters in between.
        some = driver.call("read_peers", public_keys=[buyer_public, key()])
        after = driver.call("list_peers")[buyer_public]
        assert list(some) == [buyer_public]
        took = some[buyer_public]
        for field in ("allowed_ips", "endpoint", "last_handshake", "persistent_keepalive"):
            assert took[field] == counted[field] == after[field]
        for field in ("rx_bytes", "tx_bytes"):
            assert counted[field] <= took[field] <= after[field]

        # -- an update in place keeps the counters and the session -------------------------
        driver.call(
            "set_peer",
            public_key=buyer_public,
            allowed_ips=[f"{BUYER_JOB}/32", "10.200.5.0/24"],
            keepalive=15,
        )
        updated = driver.call("list_peers")[buyer_public]
        assert updated["allowed_ips"] == [f"{BUYER_JOB}/32", "10.200.5.0/24"]
        assert updated["persistent_keepalive"] == 15
        assert updated["rx_bytes"] >= counted["rx_bytes"]
        assert updated["tx_bytes"] >= counted["tx_bytes"]
        assert updated["last_handshake"] == counted["last_handshake"]
        assert updated["endpoint"] == counted["endpoint"]  # the learnt endpoint is kept
        again = bed.exec(buyer, sys.executable, "-c", ECHO_CLIENT, check=False, timeout=60)
        assert again.returncode == 0, again.stderr
        assert driver.call("list_peers")[buyer_public]["rx_bytes"] > updated["rx_bytes"]

        # -- the agent restarts: a new backend adopts the running wireguard-go -----------------
        driver.close()
        assert pid_exists(wg_go_pid)  # the tunnels outlive the agent process
        driver = Driver(bed, prov, "userspace")
        driver.call(
            "ensure_interface",
            name=prov_if,
            private_key=base64.b64encode(provider.wireguard_private_key).decode(),
            listen_port=LISTEN_PORT,
            address=f"{PROVIDER_MESH}/17",
        )
        assert driver.call("pid") is None  # adopted, not started
        adopted = driver.call("list_peers")
        assert sorted(adopted) == sorted([buyer_public, other])
        assert adopted[buyer_public]["rx_bytes"] > updated["rx_bytes"]  # counters survived
        assert adopted[buyer_public]["last_handshake"] == counted["last_handshake"]

        # -- removing one peer leaves the other alone ---------------------------------------
        driver.call("remove_peer", public_key=other)
        peers = driver.call("list_peers")
        assert list(peers) == [buyer_public]
        assert peers[buyer_public]["rx_bytes"] > updated["rx_bytes"]

        # -- `clawnode status` reads the live peers through the backend -------------------
        state = StateDir(tmp_path / "state")
        state.save_enrollment(
            Enrollment(
                gateway="https://molt.example",
                node_id=provider.node_id,
                name="node-1",
                mesh_address=PROVIDER_MESH,
                gateway_public_key=Identity.generate().public_key_b64,
                websocket_url="wss://molt.example/ws/agent/",
                interface=prov_if,
            )
        )
        provider.save(state.identity_path)
        shown = bed.exec(prov, CLAWNODE, "status", "--state-dir", str(state.path)).stdout
        assert f"interface: {prov_if} up, listen port 51820, 1 peer" in shown
        peer_line = next(line for line in shown.splitlines() if buyer_public in line)
        assert re.search(r"handshake \d+ s ago +rx \d+\.\d KiB +tx \d+\.\d KiB", peer_line)
        assert shown.splitlines()[-1] == "gateway: not running"

        # -- plan and apply against the real device: already in the desired state ------------
        desired = {
            "node_id": provider.node_id,
            "revision": 3,
            "peers": [
                {
                    "public_key": buyer_public,
                    "allowed_ips": [f"{BUYER_JOB}/32", "10.200.5.0/24"],
                    "kind": "job",
                    "ref": "order-1",
                    "endpoint": "",
                    "persistent_keepalive": 15,
                }
            ],
            "issued_at": int(time.time()),
        }
        assert driver.call("reconcile", desired=desired) == {"actions": [], "results": {}}
        desired["peers"][0]["persistent_keepalive"] = 0
        assert driver.call("reconcile", desired=desired) == {
            "actions": ["Update"],
            "results": {buyer_public: "ok"},
        }

        # -- a peer no longer desired is cut off at once, its counters kept to be read -------
        ping = ("ping", "-c", "2", "-W", "1", PROVIDER_MESH)
        assert bed.exec(buyer, *ping, check=False).returncode == 0
        before = driver.call("list_peers")[buyer_public]
        desired["peers"], desired["revision"] = [], 4
        assert driver.call("reconcile", desired=desired) == {
            "actions": ["Retire"],
            "results": {buyer_public: "ok"},
        }
        assert bed.exec(buyer, *ping, check=False).returncode != 0  # nothing passes any more
        cut = driver.call("list_peers")[buyer_public]
        assert (cut["allowed_ips"], cut["persistent_keepalive"]) == ([], 0)
        assert cut["rx_bytes"] > before["rx_bytes"]  # the refused pings are still counted
        assert (
            f"{buyer_public}\t(none)" in bed.exec(prov, "wg", "show", prov_if, "allowed-ips").stdout
        )
        # Already cut off: nothing more to plan; what is left is the read, then the removal.
        assert driver.call("reconcile", desired=desired) == {"actions": [], "results": {}}
        driver.call("remove_peer", public_key=buyer_public)
        assert driver.call("list_peers") == {}

        # -- a refusal by wireguard-go is a WireGuardError with its errno -------------------
        hold_until_ready(bed, prov, UDP_HOLDER)
        with pytest.raises(DriverError) as info:
            driver.call(
                "ensure_interface",
                name=prov_if,
                private_key=base64.b64encode(provider.wireguard_private_key).decode(),
                listen_port=HELD_UDP_PORT,
                address=f"{PROVIDER_MESH}/17",
            )
        assert info.value.kind == "WireGuardError"
        assert info.value.errno == 98  # EADDRINUSE
        assert "refused by wireguard-go: errno 98 (EADDRINUSE" in info.value.message

        # -- delete: link gone, wireguard-go stopped, socket removed ------------------------
        driver.call("delete_interface")
        assert bed.exec(prov, "ip", "link", "show", prov_if, check=False).returncode != 0
        wait_for(lambda: not pid_exists(wg_go_pid), 10, "wireguard-go to exit")
        assert not (SOCKET_DIR / f"{prov_if}.sock").exists()
        assert driver.call("interface_exists") is False
    finally:
        driver.close()
        # The backend starts wireguard-go in a session of its own (it must outlive the agent),
        # so stop it by PID; SIGTERM first, so it removes its UAPI socket itself.
        if wg_go_pid:
            stop_pid(wg_go_pid)
        bed.down()  # the buyer's wireguard-go and the helpers, then the namespaces
        for name in (prov_if, buyer_if):
            path = SOCKET_DIR / f"{name}.sock"
            if path.exists():
                path.unlink()  # left by a process that had to be killed
