"""The in-memory backend: WireGuard's semantics without WireGuard, the test double of the daemon's
tests (unit and integration tiers) and of the browser tier's simulated nodes."""

from __future__ import annotations

import errno as errno_mod
import time
from collections.abc import Collection, Sequence
from dataclasses import replace

from ..cidr import sorted_networks
from .base import (
    NamedInterface,
    PeerStatus,
    PendingRead,
    ReadLater,
    check_allowed_ips,
    check_keepalive,
    check_public_key,
    resolve_endpoint,
)
from .errors import WireGuardError
from .links import check_address, check_routes

__all__ = ["FakeBackend"]


class FakeBackend(NamedInterface):
    """WireGuard in memory, with the real backends' semantics: upserts keep counters, one peer
    per allowed network (a later peer takes the network over, as WireGuard does).

    Test hooks: ``add_traffic`` moves counters and the handshake; ``refuse[public_key] = msg``
    makes the next changes of that peer fail like a device refusing them.
    """

    kind = "fake"

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.exists = False
        self.private_key = b""
        self.listen_port = 0
        self.address = ""
        self.routes: tuple[str, ...] = ()
        self.peers: dict[str, PeerStatus] = {}
        self.refuse: dict[str, str] = {}
        # (operation, public key or name), in order; reads too: ("list_peers", name) for the
        # whole device, ("read_peers", key) for each peer asked for.
        self.calls: list[tuple[str, str]] = []

    def interface_exists(self) -> bool:
        return self.exists

    def ensure_interface(
        self,
        name: str,
        private_key: bytes,
        listen_port: int,
        address: str,
        routes: Sequence[str] = (),
    ) -> None:
        self._bind_name(name)
        check_address(address)
        wanted_routes = check_routes(routes)
        self.calls.append(("ensure_interface", name))
        self.exists = True
        self.private_key, self.listen_port, self.address = private_key, listen_port, address
        self.routes = wanted_routes

    def _require(self) -> None:
        if not self.exists:
            raise WireGuardError(f"interface {self._name or '?'} does not exist", errno_mod.ENODEV)

    def list_peers(self) -> dict[str, PeerStatus]:
        self._require()
        self.calls.append(("list_peers", self._name))
        return dict(self.peers)

    def read_peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        self._require()
        self.calls.extend(("read_peers", key) for key in public_keys)
        return {key: self.peers[key] for key in public_keys if key in self.peers}

    def start_read(self) -> PendingRead:
        return ReadLater(self)

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str = "",
        keepalive: int = 0,
    ) -> None:
        self._require()
        check_public_key(public_key)
        networks = sorted_networks(check_allowed_ips(allowed_ips))
        check_keepalive(keepalive)
        if endpoint:
            resolve_endpoint(endpoint)
        self.calls.append(("set_peer", public_key))
        if public_key in self.refuse:
            raise WireGuardError(self.refuse[public_key], errno_mod.EIO)
        for other_key, other in list(self.peers.items()):
            if other_key != public_key and set(other.allowed_ips) & set(networks):
                kept = tuple(n for n in other.allowed_ips if n not in networks)
                self.peers[other_key] = replace(other, allowed_ips=kept)
        previous = self.peers.get(public_key) or PeerStatus(public_key=public_key, allowed_ips=())
        self.peers[public_key] = replace(
            previous,
            allowed_ips=networks,
            endpoint=endpoint or previous.endpoint,
            persistent_keepalive=keepalive,
        )

    def remove_peer(self, public_key: str) -> None:
        self._require()
        check_public_key(public_key)
        self.calls.append(("remove_peer", public_key))
        if public_key in self.refuse:
            raise WireGuardError(self.refuse[public_key], errno_mod.EIO)
        self.peers.pop(public_key, None)

    def delete_interface(self) -> None:
        self.calls.append(("delete_interface", self._name))
        self.exists = False
        self.peers.clear()

    def add_traffic(self, public_key: str, rx: int, tx: int, handshake_at: int = 0) -> None:
        peer = self.peers[public_key]
        self.peers[public_key] = replace(
            peer,
            rx_bytes=peer.rx_bytes + rx,
            tx_bytes=peer.tx_bytes + tx,
            last_handshake=handshake_at or int(time.time()),
        )
