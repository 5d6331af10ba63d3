"""`make run`'s demo providers, REAL: one `clawnode run` per demo node, each in a network
namespace of its own, with wireguard-go (the userspace backend) and the nftables firewall.

Each daemon is the agent as installed, on the state seed_demo --agents-dir --real-nodes left in
DIR/<hostname>/: identity, enrolment naming its own WireGuard interface, the GPUs it enrolled
with (reported through --simulated-gpus-file: this machine has no such GPUs), and real-node.json,
its namespace's address (the Endpoint seed_demo declared for it). No Django here.
A buyer's tunnel to a demo node carries real packets: its config names the node's namespace
address as the Endpoint, which this machine reaches over the demo bridge.

The network (marketplace.demo_data.REAL_NODES_NET), built with the netns test tier's Testbed:
  - bridge moltdemo0 in the root namespace at 198.18.0.1/24, one veth per node namespace
    (molt-demo-<hostname>, 198.18.0.11 and up), no default route out of the machine;
  - the gateway: `make run` binds 127.0.0.1, which no other namespace can reach. A DNAT rule
    (table ip molt_demo) sends what the nodes address to 198.18.0.1:PORT to the gateway's own
    address and port, with route_localnet on the bridge only (the kernel otherwise drops
    packets to and from 127.0.0.0/8 on a non-loopback interface). Chosen over a second listen
    address (uvicorn binds one) and over a TCP relay in this process (the gateway would see
    every node as 127.0.0.1; through DNAT it sees each node's own address, as in production);
    binding 0.0.0.0 instead would open the demo to the whole network.
Everything is removed on SIGTERM/SIGINT (honcho's stop) and, after a kill -9, at the next start
(remove_leftovers, which run_dev.py also calls). /run/molt-demo-nodes.lock is held while the
nodes run, so a second `make run` neither takes over nor removes them.

Usage: python scripts/demo_nodes.py DIR   (MOLT_DEMO_LOCAL_GATEWAY: the gateway's local URL)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: the repository's packages by name

from tests.netns.testbed import Testbed, run  # noqa: E402

BIN = Path(sys.executable).parent
BRIDGE = "moltdemo0"
NETNS_PREFIX = "molt-demo-"
NFT_TABLE = "molt_demo"  # family ip
LOCK_PATH = Path("/run/molt-demo-nodes.lock")
DEMO_GPUS_FILE = "demo-gpus.json"  # as marketplace.demo_data writes them
REAL_NODE_FILE = "real-node.json"
INTERFACE_RE = re.compile(r"mdemo\d+")  # marketplace.demo_data.real_nodes' interface names
UAPI_DIR = Path("/var/run/wireguard")
TOOLS = ("wireguard-go", "nft", "ip")


def missing_prerequisites() -> list[str]:
    """What this machine lacks for the real demo nodes, each worded for the banner; [] when
    nothing is missing."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and nftables need it)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (wireguard-go's TUN device)")
    missing += [f"{tool} on PATH" for tool in TOOLS if shutil.which(tool) is None]
    return missing


@dataclass(frozen=True)
class RealNode:
    hostname: str
    state: Path
    address: str
    prefix: int
    gateway_host: str
    interface: str

    @property
    def namespace(self) -> str:
        return f"{NETNS_PREFIX}{self.hostname}"

    @property
    def net(self) -> str:
        return self.address.rsplit(".", 1)[0]

    @property
    def host(self) -> int:
        return int(self.address.rsplit(".", 1)[1])


def load_nodes(root: Path) -> list[RealNode]:
    """The enrolled demo nodes seed_demo --real-nodes placed, sorted by address."""
    nodes = []
    for path in sorted(root.iterdir()):
        plan = path / REAL_NODE_FILE
        if not (path / "enrollment.json").exists() or not plan.exists():
            continue
        item = json.loads(plan.read_text())
        nodes.append(RealNode(path.name, path, **item))
    return sorted(nodes, key=lambda node: node.host)


def hold_lock() -> int | None:
    """Take /run/molt-demo-nodes.lock (kept until this process ends, a kill -9 included);
    None when another process holds it: its demo nodes are running."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock_holder_alive() -> bool:
    fd = hold_lock()
    if fd is None:
        return True
    os.close(fd)
    return False


def _leftover_wireguard_go() -> list[int]:
    """wireguard-go processes serving a demo node's interface (mdemoN), wherever they are."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names = [arg.decode(errors="replace") for arg in argv if arg]
        if (
            names
            and Path(names[0]).name == "wireguard-go"
            and any(INTERFACE_RE.fullmatch(name) for name in names[1:])
        ):
            found.append(int(proc.name))
    return found


def remove_leftovers() -> list[str]:
    """Remove what a demo-nodes run killed before its clean-up left behind: the processes in
    its namespaces (clawnode daemons, wireguard-go), the namespaces, the bridge, the DNAT table,
    UAPI sockets. Returns what was found (for the log). Call only without the lock held by
    another process (lock_holder_alive)."""
    listed = run("ip", "netns", "list", check=False).stdout.split("\n")
    namespaces = [line.split()[0] for line in listed if line.startswith(NETNS_PREFIX)]
    found = [f"namespace {name}" for name in namespaces]
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        found.append(f"bridge {BRIDGE}")
    if run("nft", "list", "table", "ip", NFT_TABLE, check=False).returncode == 0:
        found.append(f"nft table ip {NFT_TABLE}")
        run("nft", "delete", "table", "ip", NFT_TABLE, check=False)
    strays = _leftover_wireguard_go()
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    found += [f"wireguard-go pid {pid}" for pid in strays]
    # The daemons a kill -9 of this script left running in them (Testbed.down kills them).
    for name in namespaces:
        pids = run("ip", "netns", "pids", name, check=False).stdout.split()
        found += [f"pid {pid} in {name}" for pid in pids]
    sockets = [
        path.stem
        for path in (UAPI_DIR.glob("mdemo*.sock") if UAPI_DIR.is_dir() else ())
        if INTERFACE_RE.fullmatch(path.stem)
    ]
    found += [f"{UAPI_DIR}/{name}.sock" for name in sockets]
    # Testbed.down kills every process left in the namespaces, deletes them, the sockets and
    # the bridge (the veths go with their namespaces).
    Testbed(
        suffix="",
        namespaces=namespaces,
        links=[BRIDGE] if f"bridge {BRIDGE}" in found else [],
        wireguard_interfaces=sockets,
    ).down()
    return found


def gateway_target(local_url: str) -> tuple[str, int] | None:
    """(address, port) the DNAT rule sends the nodes' gateway connections to: the address the
    gateway binds (loopback for a wildcard bind); None unless that is an IPv4 address (the
    demo bridge is IPv4, and DNAT needs an address, not a name)."""
    parts = urlsplit(local_url)
    host, port = parts.hostname or "", parts.port
    if not re.fullmatch(r"\d+\.\d+\.\d+\.\d+", host) or port is None:
        return None
    return host, port


def build_network(bed: Testbed, nodes: list[RealNode], target: tuple[str, int]) -> None:
    """The bridge, the gateway's DNAT, and one namespace per node (recorded in `bed`)."""
    bed.up()
    address, port = target
    # route_localnet: packets to (and replies from) 127.0.0.1 may cross this interface; only
    # this bridge, which only the demo namespaces are on.
    run("sysctl", "-qw", f"net.ipv4.conf.{BRIDGE}.route_localnet=1")
    rules = (
        f"table ip {NFT_TABLE} {{\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f'    iifname "{BRIDGE}" ip daddr {bed.gateway_ip} tcp dport {port} '
        f"dnat to {address}:{port}\n"
        "  }\n"
        "}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    for node in nodes:
        bed.attach(bed.namespace(node.hostname, name=node.namespace), host=node.host)
        bed.wireguard_interfaces.append(node.interface)


def wait_for_gateway(base_url: str, stop: threading.Event, timeout: float = 120.0) -> None:
    """Until the gateway answers /healthz/ (web starts alongside us), so nine daemons do not
    log connection-refused retries while it starts; past `timeout` they start anyway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(f"{base_url}/healthz/", timeout=2):  # noqa: S310
                return
        except OSError:
            stop.wait(0.5)


_OUTPUT = threading.Lock()


def relay_output(name: str, stream) -> None:
    for raw in stream:
        with _OUTPUT:
            print(f"[{name}] {raw.decode(errors='replace').rstrip()}", flush=True)


def start_daemon(bed: Testbed, node: RealNode) -> subprocess.Popen:
    state = node.state
    proc = bed.popen(
        node.namespace,
        [
            str(BIN / "clawnode"), "run", "--state-dir", str(state), "--backend", "userspace",
            "--simulated-gpus-file", str(state / DEMO_GPUS_FILE),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    threading.Thread(target=relay_output, args=(node.hostname, proc.stdout), daemon=True).start()
    return proc


def stop_daemons(processes: list[subprocess.Popen], timeout: float = 3.0) -> None:
    """SIGTERM to every daemon at once, then wait: honcho SIGKILLs us 5 s after its SIGTERM,
    and the namespaces must be gone by then."""
    for proc in processes:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in processes:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def main(root: Path) -> int:
    missing = missing_prerequisites()
    if missing:
        print(f"demo nodes: cannot run real daemons, missing: {', '.join(missing)}", flush=True)
        return 1
    lock = hold_lock()
    if lock is None:
        print(f"demo nodes: another make run holds {LOCK_PATH}: its demo nodes run", flush=True)
        return 1
    nodes = load_nodes(root)
    if not nodes:
        print(f"demo nodes: none placed in {root} (seed_demo --real-nodes)", flush=True)
        return 1
    first = nodes[0]
    local = os.environ.get("MOLT_DEMO_LOCAL_GATEWAY", "")
    target = gateway_target(local)
    if target is None:
        print(f"demo nodes: the gateway {local!r} is not at an IPv4 address", flush=True)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    left = remove_leftovers()
    if left:
        print(f"demo nodes: removed what a killed run left: {', '.join(left)}", flush=True)
    bed = Testbed(suffix="", net=first.net, bridge_name=BRIDGE)
    processes: list[subprocess.Popen] = []
    failed = False
    try:
        build_network(bed, nodes, target)
        print(
            f"demo nodes: {len(nodes)} REAL clawnode daemons (wireguard-go, nftables), each in "
            f"a network namespace ({NETNS_PREFIX}<hostname>, {first.net}.0/{first.prefix} on "
            f"bridge {BRIDGE}); the gateway is {bed.gateway_ip}:{target[1]} to them (DNAT to "
            f"{target[0]}:{target[1]}); GPUs simulated",
            flush=True,
        )
        wait_for_gateway(local, stop)
        if not stop.is_set():
            processes = [start_daemon(bed, node) for node in nodes]
        while not stop.is_set():
            for proc, node in zip(processes, nodes, strict=True):
                if proc.poll() is not None:
                    # respawn.py starts us again (and the network afresh) if we exit.
                    print(
                        f"demo nodes: {node.hostname}'s daemon exited ({proc.returncode}): "
                        "stopping them all",
                        flush=True,
                    )
                    failed = True
                    stop.set()
            stop.wait(1.0)
    finally:
        stop_daemons(processes)
        bed.down()
        run("nft", "delete", "table", "ip", NFT_TABLE, check=False)
        os.close(lock)
    print("demo nodes: stopped; namespaces, wireguard-go and nft rules removed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.rsplit("Usage: ", 1)[1])
    sys.exit(main(Path(sys.argv[1])))
