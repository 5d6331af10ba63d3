"""What every WireGuard backend is: the ``WireGuardBackend`` interface, the ``PeerStatus`` it
reports, and what the implementations share (argument checks, endpoint resolution, interface
name bookkeeping).

Peers are changed one at a time (``set_peer`` is an upsert of one peer, ``remove_peer`` removes
one): never replace-all, which would reset every peer's counters and drop live sessions.

Key formats (design/network.md): base64 in this interface and for pyroute2, 64 hex characters
on the UAPI socket (backends.uapi), raw bytes on netlink (pyroute2 encodes those).
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..keys import InvalidKey, parse_wireguard_public_key, wireguard_public_key
from ..wire import parse_endpoint
from .errors import WireGuardError

__all__ = [
    "MAX_KEEPALIVE",
    "NamedInterface",
    "PeerStatus",
    "PendingRead",
    "ReadLater",
    "WireGuardBackend",
    "check_allowed_ips",
    "check_keepalive",
    "check_public_key",
    "format_endpoint",
    "resolve_endpoint",
    "same_private_key",
]

MAX_KEEPALIVE = 65535


@dataclass(frozen=True)
class PeerStatus:
    """One peer as the interface has it now."""

    public_key: str  # base64
    allowed_ips: tuple[str, ...]  # canonical CIDR strings, sorted
    endpoint: str = ""  # "ip:port" ("[ip6]:port"), "" until known
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: int = 0  # Unix seconds; 0 = never
    persistent_keepalive: int = 0  # seconds; 0 = off


class PendingRead(Protocol):
    """A read started by WireGuardBackend.start_read."""

    def peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]: ...

    def close(self) -> None: ...


class ReadLater:
    """start_read of a backend that cannot split a read: read_peers when collected."""

    def __init__(self, backend: WireGuardBackend) -> None:
        self._backend = backend

    def peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        return self._backend.read_peers(public_keys)

    def close(self) -> None:
        pass


class WireGuardBackend(Protocol):
    """What the agent needs from WireGuard. All keys are base64 strings except the private key.

    Methods raise WireGuardError with a message naming the interface and what failed.
    """

    kind: str  # "kernel", "userspace" or "fake"

    @property
    def name(self) -> str: ...

    def ensure_interface(
        self,
        name: str,
        private_key: bytes,
        listen_port: int,
        address: str,
        routes: Sequence[str] = (),
    ) -> None:
        """Create (or adopt) interface ``name`` with this key, port and address (CIDR), route
        each network of ``routes`` onto it (the job block: peers' addresses that are not on-link
        with ``address``; a route the agent left there earlier and no longer wants is removed),
        and bring it up. Idempotent: existing peers and their counters are left alone."""
        ...

    def interface_exists(self) -> bool: ...

    def list_peers(self) -> dict[str, PeerStatus]: ...

    def read_peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        """The current status of these peers only (those the interface lacks are left out).
        Still one read of the whole device, but only these peers are parsed: the agent reads
        the last counters of peers it is about to remove."""
        ...

    def start_read(self) -> PendingRead:
        """Ask the device for its peers now, and collect them with ``peers(public_keys)`` (the
        same as read_peers) or drop them with ``close()``: the caller works while the device
        answers. The reading happens when collected where a read cannot be split."""
        ...

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str = "",
        keepalive: int = 0,
    ) -> None:
        """Add the peer or update it in place (counters kept): its allowed IPs are replaced
        by ``allowed_ips``, keepalive set, endpoint set when given ("" leaves it as learnt)."""
        ...

    def remove_peer(self, public_key: str) -> None: ...

    def delete_interface(self) -> None: ...


# -- argument checks and endpoints -----------------------------------------------------------------


def check_public_key(public_key: str) -> str:
    try:
        parse_wireguard_public_key(public_key)
    except InvalidKey as exc:
        raise WireGuardError(str(exc), errno_mod.EINVAL) from None
    return public_key


def check_allowed_ips(allowed_ips: Sequence[str]) -> tuple[str, ...]:
    if isinstance(allowed_ips, str):
        raise WireGuardError("allowed_ips must be a list of CIDR strings, not one string")
    out = []
    for text in allowed_ips:
        try:
            out.append(str(ipaddress.ip_network(text, strict=True)))
        except (ValueError, TypeError):
            raise WireGuardError(
                f"allowed IP {text!r} is not a network", errno_mod.EINVAL
            ) from None
    return tuple(out)


def check_keepalive(keepalive: int) -> int:
    if not isinstance(keepalive, int) or isinstance(keepalive, bool):
        raise WireGuardError("keepalive must be an integer", errno_mod.EINVAL)
    if not 0 <= keepalive <= MAX_KEEPALIVE:
        raise WireGuardError(f"keepalive must be 0-{MAX_KEEPALIVE} s", errno_mod.EINVAL)
    return keepalive


def resolve_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` -> (IP literal, port). Neither UAPI nor netlink take host names, so names
    are resolved here (as ``wg`` does), preferring IPv4."""
    try:
        host, port = parse_endpoint(endpoint)
    except ValueError as exc:
        raise WireGuardError(str(exc), errno_mod.EINVAL) from None
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise WireGuardError(f"cannot resolve endpoint host {host!r}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), port


def format_endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def same_private_key(a: bytes, b: bytes) -> bool:
    # Devices report the clamped scalar; compare through the public keys, which ignore clamping.
    return wireguard_public_key(a) == wireguard_public_key(b)


class NamedInterface:
    """The name bookkeeping every backend shares."""

    def __init__(self, name: str = "") -> None:
        self._name = name

    @property
    def name(self) -> str:
        if not self._name:
            raise WireGuardError("no interface yet: call ensure_interface first")
        return self._name

    def _bind_name(self, name: str) -> None:
        if not name or len(name) > 15 or "/" in name or name.strip() != name:
            raise WireGuardError(f"interface name {name!r} must be 1-15 characters, no '/'")
        if self._name and self._name != name:
            raise WireGuardError(f"this backend manages {self._name}, not {name}")
        self._name = name
