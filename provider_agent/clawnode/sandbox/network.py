"""A job sandbox's network on the node: its own network namespace joined to the host by a veth
pair that carries the sandbox's address (engine.SandboxNetwork).

Per ref ("order:42"):
- a named namespace, ``molt-order-42`` (/var/run/netns/molt-order-42): the container joins it;
- a veth pair: ``msbx<hash>`` on the host (the firewall matches every sandbox by the ``msbx``
  prefix, so a new sandbox is covered by the rules before its link even exists), ``eth0``
  inside;
- inside: lo up, the sandbox address as a /32 on eth0, a default route via the link-local
  gateway 169.254.0.1, on-link (no subnet to share with anyone);
- on the host: 169.254.0.1/32 on the veth (the sandbox's gateway, and the source of the host's
  own readiness probe), a route to the sandbox address /32 through the veth, IPv4 forwarding on.
What may cross the veth is clawnode.firewall's business (the daemon renders it from the signed
desired state): the network here only connects.

The netlink work runs through pyroute2 in a short-lived child, ``python -m
clawnode.sandbox.network setup REF ADDRESS`` (as clawnode.backends.links does), so the
long-lived agent never imports pyroute2. This module imports nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Any

from .. import child

__all__ = [
    "GATEWAY",
    "HOST_VETH_PREFIX",
    "NETNS_DIR",
    "NetnsSandboxNetwork",
    "SandboxNetworkError",
    "host_veth",
    "netns_name",
    "ref_of_netns",
]

NETNS_DIR = Path("/var/run/netns")
NETNS_PREFIX = "molt-"
HOST_VETH_PREFIX = "msbx"  # + 11 hex digits: 15 characters, the most a link name may have
INNER_VETH = "eth0"
GATEWAY = "169.254.0.1"  # link-local: never routed, the same on every sandbox's veth
CHILD_TIMEOUT_S = 60.0
# A ref maps to a namespace name and back: ':' becomes '-', so '-' itself is not allowed.
_REF = re.compile(r"[A-Za-z0-9_.:]{1,64}")


class SandboxNetworkError(RuntimeError):
    """Making or removing a sandbox's network failed; the message names what and why."""


def _check_ref(ref: str) -> str:
    if not _REF.fullmatch(ref):
        raise SandboxNetworkError(
            f"ref {ref!r} cannot name a sandbox network (1-64 of A-Z a-z 0-9 _ . :)"
        )
    return ref


def netns_name(ref: str) -> str:
    """The namespace of ``ref``: "order:42" -> "molt-order-42"."""
    return NETNS_PREFIX + _check_ref(ref).replace(":", "-")


def ref_of_netns(name: str) -> str | None:
    """The ref a namespace name was made for, or None for a namespace that is not a sandbox's."""
    if not name.startswith(NETNS_PREFIX):
        return None
    ref = name[len(NETNS_PREFIX) :].replace("-", ":")
    return ref if _REF.fullmatch(ref) else None


def host_veth(ref: str) -> str:
    """The host side of ``ref``'s veth: the prefix and a hash (a ref may be longer than a link
    name; 44 bits make a clash between two sandboxes of one node negligible). Any ref has one,
    so the firewall can confine a sandbox whose namespace could not be made."""
    digest = hashlib.sha256(ref.encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[: 15 - len(HOST_VETH_PREFIX)]


def _check_address(address: str) -> ipaddress.IPv4Interface:
    try:
        parsed = ipaddress.IPv4Interface(address)
    except ValueError:
        raise SandboxNetworkError(f"address {address!r} is not an IPv4 address") from None
    if parsed.network.prefixlen != 32:
        raise SandboxNetworkError(f"address {address!r} must be a /32")
    return parsed


# -- the child: pyroute2 -------------------------------------------------------------------------


def _pyroute2() -> tuple[Any, Any, type[Exception]]:
    from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    return IPRoute, netns, NetlinkError


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _only_address(ipr: Any, index: int, address: str) -> None:
    """Give link ``index`` exactly ``address`` (/32) among its IPv4 addresses."""
    present = False
    for entry in ipr.get_addr(index=index, family=2):
        ip, prefixlen = entry.get_attr("IFA_ADDRESS"), entry["prefixlen"]
        if ip == address and prefixlen == 32:
            present = True
        else:
            ipr.addr("del", index=index, address=ip, prefixlen=prefixlen)
    if not present:
        ipr.addr("add", index=index, address=address, prefixlen=32)


def setup_network(ref: str, address: str) -> str:
    """Make (or complete, or leave as it is) ``ref``'s namespace and veth; returns the path of
    the namespace. Run as root, in the child."""
    IPRoute, netns, NetlinkError = _pyroute2()
    name, host = netns_name(ref), host_veth(ref)
    ip = str(_check_address(address).ip)
    path = str(NETNS_DIR / name)
    try:
        if name not in netns.listnetns():
            netns.create(name)
        with IPRoute() as ipr:
            index = _index(ipr, host)
            if index is not None and not _inner_present(name):
                # Half made (the agent died between the two steps): start the pair again.
                ipr.link("del", index=index)
                index = None
            if index is None:
                # The inner end is made inside the namespace at once: a host link named eth0
                # would clash with the host's own.
                inner = {"ifname": INNER_VETH, "net_ns_fd": name}
                ipr.link("add", ifname=host, kind="veth", peer=inner)
                index = _index(ipr, host)
                if index is None:
                    raise SandboxNetworkError(f"veth {host} vanished right after it was made")
            # No IPv6 on the host side: nothing of the host answers the sandbox on fe80::
            # (a kernel without IPv6 has no such setting, and nothing to answer with).
            with contextlib.suppress(FileNotFoundError):
                _sysctl(f"net/ipv6/conf/{host}/disable_ipv6", "1")
            _only_address(ipr, index, GATEWAY)
            ipr.link("set", index=index, state="up")
            ipr.route("replace", dst=f"{ip}/32", oif=index, scope=253)  # scope link
        # Routed from the tunnel to the veth and, with egress, out to the internet.
        _sysctl("net/ipv4/ip_forward", "1")
        _setup_inside(name, ip)
    except NetlinkError as exc:
        code = getattr(exc, "code", 0) or 0
        text = os.strerror(code) if code else str(exc)
        raise SandboxNetworkError(f"setting up the network of {ref}: {text}") from None
    except OSError as exc:
        raise SandboxNetworkError(f"setting up the network of {ref}: {exc}") from None
    return path


def _in_netns(name: str) -> Any:
    """An IPRoute inside namespace ``name`` (pyroute2 opens the socket there)."""
    from pyroute2 import NetNS

    return NetNS(name)


def _inner_present(name: str) -> bool:
    with _in_netns(name) as ns:
        return _index(ns, INNER_VETH) is not None


def _setup_inside(name: str, ip: str) -> None:
    with _in_netns(name) as ns:
        lo = _index(ns, "lo")
        if lo is not None:
            ns.link("set", index=lo, state="up")
        inner = _index(ns, INNER_VETH)
        if inner is None:
            raise SandboxNetworkError(f"{INNER_VETH} is missing in namespace {name}")
        _only_address(ns, inner, ip)
        ns.link("set", index=inner, state="up")
        ns.route("replace", dst="0.0.0.0/0", gateway=GATEWAY, oif=inner, flags=4)  # RTNH_F_ONLINK


def teardown_network(ref: str) -> bool:
    """Remove ``ref``'s veth and namespace; True if anything was there."""
    IPRoute, netns, NetlinkError = _pyroute2()
    name, host = netns_name(ref), host_veth(ref)
    found = False
    try:
        with IPRoute() as ipr:
            index = _index(ipr, host)
            if index is not None:
                # The pair goes with either end; its route to the sandbox with it.
                ipr.link("del", index=index)
                found = True
        if name in netns.listnetns():
            netns.remove(name)
            found = True
    except NetlinkError as exc:
        code = getattr(exc, "code", 0) or 0
        text = os.strerror(code) if code else str(exc)
        raise SandboxNetworkError(f"removing the network of {ref}: {text}") from None
    except OSError as exc:
        raise SandboxNetworkError(f"removing the network of {ref}: {exc}") from None
    return found


def present_refs() -> list[str]:
    """The refs whose namespaces exist (no pyroute2 needed: the namespaces are files)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(ref for ref in map(ref_of_netns, names) if ref is not None)


_OPERATIONS: child.Operations = {
    "setup": (("REF", "ADDRESS"), setup_network),
    "teardown": (("REF",), teardown_network),
}


def in_child(operation: str, *args: str, timeout: float = CHILD_TIMEOUT_S) -> Any:
    """Run one operation in a child interpreter (clawnode.child); its SandboxNetworkError is
    raised here."""
    if operation not in _OPERATIONS:
        raise ValueError(f"unknown sandbox network operation {operation!r}")
    try:
        return child.call("clawnode.sandbox.network", operation, args, timeout)
    except child.ChildError as exc:
        raise SandboxNetworkError(str(exc)) from None


class NetnsSandboxNetwork:
    """engine.SandboxNetwork on this host's kernel. ``peer_address`` and ``egress`` are the
    firewall's (the daemon renders them into the agent's table from the desired state); they
    are checked here so a bad spec fails before anything is made."""

    def setup(self, ref: str, address: str, peer_address: str, egress: bool) -> str:
        netns_name(ref)
        _check_address(address)
        _check_address(peer_address)
        return str(in_child("setup", ref, address))

    def teardown(self, ref: str) -> None:
        netns_name(ref)
        in_child("teardown", ref)

    def present(self) -> set[str]:
        return set(present_refs())


def main(argv: list[str]) -> int:
    """The child: one operation, one JSON line on stdout ({"result"} or {"error"})."""
    return child.serve("clawnode.sandbox.network", _OPERATIONS, SandboxNetworkError, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
