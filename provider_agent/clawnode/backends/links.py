"""Links and addresses through pyroute2's IPRoute, in this process or in a short-lived child.

Both real backends put the node's address on the WireGuard interface and bring it up with
pyroute2 (never by running ``ip``). Importing pyroute2 costs the process about 8 MB of resident
memory for good. The kernel backend needs pyroute2 for generic netlink on every peer change
anyway; the userspace backend (wireguard-go, configured over its UAPI socket) needs it only once
at start-up. So the userspace backend runs these one-off calls in a child,
``python -m clawnode.backends.links configure IFACE ADDRESS [ROUTE...]``, which imports
pyroute2, does the work, answers one JSON line and exits: the long-lived agent never loads
pyroute2 (``in_child``).

This module imports nothing heavy at module level (no PyNaCl, no pyroute2), so the child starts
quickly.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from .. import child
from .errors import WireGuardError

__all__ = [
    "check_address",
    "check_routes",
    "configure_link",
    "delete_link",
    "in_child",
    "kernel_wireguard_available",
    "link_exists",
    "link_routes",
]

CHILD_TIMEOUT_S = 60.0
MAIN_TABLE = 254
RTPROT_STATIC = 4  # how the agent marks the routes it puts on its interface
SCOPE_LINK = 253
ANY_IPV4 = "0.0.0.0"  # noqa: S104  (a route's destination, not a bind)


def check_address(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in address:
        raise WireGuardError(f"interface address {address!r} must be in CIDR form (a.b.c.d/n)")
    try:
        return ipaddress.ip_interface(address)
    except ValueError:
        raise WireGuardError(f"interface address {address!r} is not valid") from None


def pyroute2() -> tuple[Any, Any, type[Exception]]:
    """pyroute2's IPRoute, WireGuard and NetlinkError, imported on first use: importing pyroute2
    takes a quarter of a second and 8 MB, which `clawnode join`, the pure helpers and the
    userspace agent do not need."""
    from pyroute2 import IPRoute, WireGuard  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    return IPRoute, WireGuard, NetlinkError


def netlink_error(exc: Exception, what: str) -> WireGuardError:
    code = getattr(exc, "code", 0) or 0
    text = os.strerror(code) if code else str(exc)
    return WireGuardError(f"{what}: {text}", code)


def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def check_routes(routes: Sequence[str]) -> tuple[str, ...]:
    """The networks to route onto the interface, canonical; WireGuardError for one that is not
    an IPv4 network written without host bits."""
    out = []
    for text in routes:
        try:
            network = ipaddress.IPv4Network(text, strict=True)
        except ValueError:
            raise WireGuardError(f"route {text!r} is not an IPv4 network (a.b.c.0/n)") from None
        out.append(str(network))
    return tuple(out)


def configure_link(name: str, address: str, *routes: str) -> None:
    """Give ``name`` exactly one address of ``address``'s family (this one), route each of
    ``routes`` onto it, and bring it up.

    The interface is the agent's: an address left from an earlier enrolment is removed, so the
    node never answers on a mesh address it no longer owns, and so is a route the agent put
    there (protocol static) that is no longer wanted. ``routes`` are the networks whose hosts
    are peers of the interface but not on-link with its address: the job block, whose buyer
    addresses a sandbox answers through the tunnel.
    """
    IPRoute, _, NetlinkError = pyroute2()
    wanted = check_address(address)
    wanted_routes = check_routes(routes)
    family = socket.AF_INET if wanted.version == 4 else socket.AF_INET6
    try:
        with IPRoute() as ipr:
            index = link_index(ipr, name)
            if index is None:
                raise WireGuardError(f"interface {name} does not exist", errno_mod.ENODEV)
            present = False
            for entry in ipr.get_addr(index=index, family=family):
                ip = entry.get_attr("IFA_ADDRESS")
                prefixlen = entry["prefixlen"]
                if ip == str(wanted.ip) and prefixlen == wanted.network.prefixlen:
                    present = True
                elif wanted.version == 6 and ipaddress.ip_address(ip).is_link_local:
                    continue  # the kernel's own fe80:: address
                else:
                    ipr.addr("del", index=index, address=ip, prefixlen=prefixlen)
            if not present:
                ipr.addr(
                    "add", index=index, address=str(wanted.ip), prefixlen=wanted.network.prefixlen
                )
            ipr.link("set", index=index, state="up")
            for entry in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
                if entry.get_attr("RTA_OIF") != index or entry["proto"] != RTPROT_STATIC:
                    continue
                dst = _route_dst(entry)
                if dst not in wanted_routes:
                    # The kernel matches a deleted route's scope too: give the one it has.
                    ipr.route("del", dst=dst, oif=index, table=MAIN_TABLE, scope=entry["scope"])
            for network in wanted_routes:
                ipr.route(
                    "replace",
                    dst=network,
                    oif=index,
                    table=MAIN_TABLE,
                    proto=RTPROT_STATIC,
                    scope=SCOPE_LINK,
                )
    except NetlinkError as exc:
        raise netlink_error(exc, f"configuring interface {name} with {address}") from None


def _route_dst(entry: Any) -> str:
    """A route message's destination as a network ("0.0.0.0/0" for a default route)."""
    return f"{entry.get_attr('RTA_DST') or ANY_IPV4}/{entry['dst_len']}"


def link_routes(name: str) -> list[str]:
    """The IPv4 networks routed onto ``name`` by the agent (protocol static, main table)."""
    IPRoute, _, _ = pyroute2()
    with IPRoute() as ipr:
        index = link_index(ipr, name)
        if index is None:
            return []
        return sorted(
            _route_dst(entry)
            for entry in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
            if entry.get_attr("RTA_OIF") == index and entry["proto"] == RTPROT_STATIC
        )


def link_exists(name: str) -> bool:
    IPRoute, _, _ = pyroute2()
    with IPRoute() as ipr:
        return link_index(ipr, name) is not None


def delete_link(name: str) -> bool:
    """Delete the link if it exists; True if it existed."""
    IPRoute, _, NetlinkError = pyroute2()
    try:
        with IPRoute() as ipr:
            index = link_index(ipr, name)
            if index is None:
                return False
            ipr.link("del", index=index)
            return True
    except NetlinkError as exc:
        if getattr(exc, "code", 0) == errno_mod.ENODEV:
            return False
        raise netlink_error(exc, f"deleting interface {name}") from None


def kernel_wireguard_available() -> tuple[bool, str]:
    """Does the running kernel speak WireGuard? (available, why) — asks generic netlink for the
    'wireguard' family, which is what KernelBackend needs (and loads the module if it can)."""
    try:
        _, WireGuard, NetlinkError = pyroute2()
    except ImportError as exc:
        return False, f"pyroute2 is missing ({exc})"
    try:
        sock = WireGuard()
    except NetlinkError as exc:
        if getattr(exc, "code", 0) == errno_mod.ENOENT:
            return False, "the kernel has no WireGuard (generic netlink family 'wireguard' missing)"
        return False, f"the kernel WireGuard netlink family is unusable: {exc}"
    except OSError as exc:
        return False, f"cannot open generic netlink: {exc}"
    sock.close()
    return True, "the kernel has WireGuard (generic netlink family 'wireguard')"


# -- the child -------------------------------------------------------------------------------------

_OPERATIONS: child.Operations = {
    # name: (arguments, function)
    "configure": (("IFACE", "ADDRESS", "ROUTE..."), configure_link),
    "delete": (("IFACE",), delete_link),
    "exists": (("IFACE",), link_exists),
    "routes": (("IFACE",), link_routes),
    "probe-kernel": ((), kernel_wireguard_available),
}


def in_child(operation: str, *args: str, timeout: float = CHILD_TIMEOUT_S) -> Any:
    """Run one operation of this module in a child interpreter (clawnode.child) and return its
    result (JSON types: a tuple comes back as a list); its WireGuardError is raised here with
    its errno."""
    if operation not in _OPERATIONS:
        raise ValueError(f"unknown link operation {operation!r}")
    try:
        return child.call("clawnode.backends.links", operation, args, timeout)
    except child.ChildError as exc:
        raise WireGuardError(str(exc), exc.errno) from None


def main(argv: list[str]) -> int:
    """The child: one operation, one JSON line on stdout ({"result"} or {"error", "errno"})."""
    return child.serve("clawnode.backends.links", _OPERATIONS, WireGuardError, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
