"""The kernel's WireGuard generic netlink messages as pyroute2 has them: a device dump merged into
one PeerStatus per peer, and the peer dict of one set call. Pure: no sockets here
(backends.kernel talks to the kernel)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from ..cidr import sorted_networks
from .base import (
    PeerStatus,
    check_allowed_ips,
    check_keepalive,
    check_public_key,
    format_endpoint,
    resolve_endpoint,
)

__all__ = ["decode_key_attr", "netlink_peer", "peers_from_netlink_dump"]


def decode_key_attr(value: object) -> str:
    # pyroute2 decodes key attributes to base64 bytes.
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def peers_from_netlink_dump(messages: Iterable[Any]) -> dict[str, PeerStatus]:
    """Merge every part of a WG_CMD_GET_DEVICE dump into one PeerStatus per peer.

    The kernel splits a large device over several messages; a peer whose allowed IPs do not fit
    continues in the next message, which repeats its public key with the remaining allowed IPs
    (and no counters). Reading only the first part would lose peers; overwriting on the repeat
    would lose allowed IPs or counters.
    """
    peers: dict[str, PeerStatus] = {}
    for message in messages:
        for peer in message.get_attr("WGDEVICE_A_PEERS") or ():
            key = decode_key_attr(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            allowed = [
                ip["addr"] for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or () if "addr" in ip
            ]
            endpoint = ""
            raw_endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
            if raw_endpoint and raw_endpoint.get("port"):
                endpoint = format_endpoint(raw_endpoint["addr"], raw_endpoint["port"])
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            fields: dict[str, Any] = {}
            if endpoint:
                fields["endpoint"] = endpoint
            for attr, name in (
                ("WGPEER_A_RX_BYTES", "rx_bytes"),
                ("WGPEER_A_TX_BYTES", "tx_bytes"),
                ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", "persistent_keepalive"),
            ):
                value = peer.get_attr(attr)
                if value is not None:
                    fields[name] = int(value)
            if handshake:
                fields["last_handshake"] = int(handshake.get("tv_sec", 0))
            previous = peers.get(key)
            if previous is None:
                peers[key] = PeerStatus(
                    public_key=key, allowed_ips=sorted_networks(allowed), **fields
                )
            else:
                merged = sorted_networks((*previous.allowed_ips, *allowed))
                peers[key] = replace(previous, allowed_ips=merged, **fields)
    return peers


def netlink_peer(
    public_key: str, allowed_ips: Sequence[str], endpoint: str, keepalive: int
) -> dict[str, Any]:
    """The pyroute2 peer dict for one set call: replaces this peer's allowed IPs only."""
    peer: dict[str, Any] = {
        "public_key": check_public_key(public_key),
        "allowed_ips": list(check_allowed_ips(allowed_ips)),
        "replace_allowed_ips": True,
        "persistent_keepalive": check_keepalive(keepalive),
    }
    if endpoint:
        peer["endpoint_addr"], peer["endpoint_port"] = resolve_endpoint(endpoint)
    return peer
