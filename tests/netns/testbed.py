"""Network-namespace testbed: hosts as namespaces, joined to the root namespace by a bridge.

Follows testing.md: the root namespace gets a bridge on 198.51.100.1/24 (a documentation range;
never 192.0.2.0/24, which the machine's uplink uses) with one veth per namespace; no namespace
gets a default route out of the machine. Names carry a per-run suffix because wireguard-go's
UAPI sockets in /var/run/wireguard are shared by all namespaces. Everything created is removed
on exit, even when the test fails.

`make run`'s real demo nodes (scripts/demo_nodes.py) are built with this same class, on a bridge
and network of their own (`net`, `bridge_name`) with fixed names and addresses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

BRIDGE_NET = "198.51.100"


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


@dataclass
class Testbed:
    __test__ = False  # not a test class, whatever its name
    suffix: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    wireguard_interfaces: list[str] = field(default_factory=list)
    net: str = BRIDGE_NET  # the bridge's /24, as its first three octets
    bridge_name: str = ""  # default: mtbr<suffix>
    _next_host: int = 2

    @property
    def bridge(self) -> str:
        return self.bridge_name or f"mtbr{self.suffix}"[:15]

    @property
    def gateway_ip(self) -> str:
        return f"{self.net}.1"

    def up(self) -> Testbed:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        run("ip", "addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        return self

    def namespace(self, role: str, name: str = "") -> str:
        """A new namespace `role` (or named `name`) with lo up (no links yet). Returns its
        name."""
        name = name or f"m{role}{self.suffix}"[:15]
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def attach(self, ns: str, host: int = 0) -> str:
        """Connect `ns` to the bridge (as `host`, else the next free one); returns its address
        on the bridge's /24."""
        if not host:
            host = self._next_host
            self._next_host += 1
        outside, inside = f"mv{host}o{self.suffix}"[:15], f"mv{host}i{self.suffix}"[:15]
        run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self.links.append(outside)
        run("ip", "link", "set", outside, "master", self.bridge)
        run("ip", "link", "set", outside, "up")
        run("ip", "link", "set", inside, "netns", ns)
        address = f"{self.net}.{host}"
        run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        run("ip", "-n", ns, "link", "set", inside, "up")
        return address

    def wireguard_name(self, role: str) -> str:
        """A WireGuard interface name unique to this run (UAPI sockets are shared)."""
        name = f"m{role}{self.suffix}"[:15]
        self.wireguard_interfaces.append(name)
        return name

    def link(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str, tag: str) -> None:
        """A direct veth between two namespaces (a LAN), with CIDR addresses on each side."""
        a, b = f"ml{tag}a{self.suffix}"[:15], f"ml{tag}b{self.suffix}"[:15]
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        run("ip", "link", "set", a, "netns", ns_a)
        run("ip", "link", "set", b, "netns", ns_b)
        run("ip", "-n", ns_a, "addr", "add", addr_a, "dev", a)
        run("ip", "-n", ns_b, "addr", "add", addr_b, "dev", b)
        run("ip", "-n", ns_a, "link", "set", a, "up")
        run("ip", "-n", ns_b, "link", "set", b, "up")

    def exec(self, ns: str, *args: str, check: bool = True, timeout: float = 30):
        return run("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)

    def popen(self, ns: str, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args], start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def down(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        for ns in reversed(self.namespaces):
            # Processes still inside (wireguard-go forks) die with a kill of the namespace's pids.
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        for name in self.wireguard_interfaces:
            # wireguard-go killed hard leaves its UAPI socket behind in the shared directory.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/var/run/wireguard/{name}.sock")
        for link in reversed(self.links):
            run("ip", "link", "del", link, check=False)


@contextlib.contextmanager
def network_testbed() -> Iterator[Testbed]:
    bed = Testbed()
    try:
        yield bed.up()
    finally:
        bed.down()
