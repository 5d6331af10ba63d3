"""The kernel backend: the kernel's ``wireguard`` link type and generic netlink through pyroute2
(>= 0.9.3): one peer per set call, every part of a multi-part dump read and merged
(backends.netlink)."""

from __future__ import annotations

import contextlib
import errno as errno_mod
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from ..keys import encode_key, parse_wireguard_private_key
from . import links
from .base import (
    NamedInterface,
    PeerStatus,
    PendingRead,
    ReadLater,
    check_public_key,
    same_private_key,
)
from .errors import WireGuardError
from .links import check_address, kernel_wireguard_available
from .netlink import decode_key_attr, netlink_peer, peers_from_netlink_dump

__all__ = ["KernelBackend"]


class KernelBackend(NamedInterface):
    """The kernel's WireGuard through pyroute2's IPRoute (link) and WireGuard (genl) sockets."""

    kind = "kernel"

    @contextlib.contextmanager
    def _wg(self, what: str) -> Iterator[Any]:
        _, WireGuard, NetlinkError = links.pyroute2()
        try:
            sock = WireGuard()
        except NetlinkError as exc:
            if getattr(exc, "code", 0) == errno_mod.ENOENT:
                raise WireGuardError(
                    f"{what} on {self.name}: the kernel has no WireGuard (use --backend userspace)",
                    errno_mod.EOPNOTSUPP,
                ) from None
            raise links.netlink_error(exc, f"{what} on {self.name}") from None
        try:
            yield sock
        except NetlinkError as exc:
            raise links.netlink_error(exc, f"{what} on {self.name}") from None
        finally:
            sock.close()

    def _dump(self, what: str) -> list[Any]:
        with self._wg(what) as wg:
            return list(wg.info(self.name))

    def interface_exists(self) -> bool:
        return links.link_exists(self.name)

    def ensure_interface(
        self,
        name: str,
        private_key: bytes,
        listen_port: int,
        address: str,
        routes: Sequence[str] = (),
    ) -> None:
        IPRoute, _, NetlinkError = links.pyroute2()
        self._bind_name(name)
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise WireGuardError("private key must be 32 bytes")
        check_address(address)
        wanted_routes = links.check_routes(routes)
        available, why = kernel_wireguard_available()
        if not available:
            raise WireGuardError(f"cannot create {name}: {why}", errno_mod.EOPNOTSUPP)
        try:
            with IPRoute() as ipr:
                if links.link_index(ipr, name) is None:
                    ipr.link("add", ifname=name, kind="wireguard")
        except NetlinkError as exc:
            raise links.netlink_error(exc, f"creating interface {name}") from None
        current_key = b""
        current_port = None
        for message in self._dump("reading configuration"):
            key = message.get_attr("WGDEVICE_A_PRIVATE_KEY")
            if key:
                current_key = parse_wireguard_private_key(decode_key_attr(key))
            port = message.get_attr("WGDEVICE_A_LISTEN_PORT")
            if port is not None:
                current_port = int(port)
        settings: dict[str, Any] = {}
        if not current_key or not same_private_key(current_key, private_key):
            settings["private_key"] = encode_key(private_key)
        if current_port != listen_port:
            settings["listen_port"] = int(listen_port)
        if settings:
            with self._wg("setting key and listen port") as wg:
                wg.set(self.name, **settings)
        links.configure_link(name, address, *wanted_routes)

    def list_peers(self) -> dict[str, PeerStatus]:
        return peers_from_netlink_dump(self._dump("reading peers"))

    def read_peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        # A netlink dump is of the whole device; there is no cheaper way to a peer's counters.
        peers = self.list_peers()
        return {key: peers[key] for key in public_keys if key in peers}

    def start_read(self) -> PendingRead:
        return ReadLater(self)

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str = "",
        keepalive: int = 0,
    ) -> None:
        peer = netlink_peer(public_key, allowed_ips, endpoint, keepalive)
        with self._wg(f"setting peer {public_key}") as wg:
            wg.set(self.name, peer=peer)

    def remove_peer(self, public_key: str) -> None:
        check_public_key(public_key)
        with self._wg(f"removing peer {public_key}") as wg:
            wg.set(self.name, peer={"public_key": public_key, "remove": True})

    def delete_interface(self) -> None:
        links.delete_link(self.name)
