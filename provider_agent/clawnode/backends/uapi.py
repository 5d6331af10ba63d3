"""wireguard-go's UAPI text: keys as 64 hex characters, and the parsing of a ``get=1`` reply
(whole, or only the peers asked for, from its raw bytes). Pure: no sockets here
(backends.userspace talks to the socket)."""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Collection
from typing import Any

from ..cidr import sorted_networks
from ..keys import encode_key, parse_wireguard_public_key
from .base import PeerStatus
from .errors import WireGuardError

__all__ = ["hex_to_key", "key_to_hex", "parse_uapi_get", "parse_uapi_peers", "uapi_error"]


def key_to_hex(key_b64: str) -> str:
    """base64 key -> 64 lowercase hex characters (the UAPI format)."""
    return parse_wireguard_public_key(key_b64).hex()


def hex_to_key(text: str) -> str:
    """64 hex characters (UAPI) -> base64 key."""
    if len(text) != 64:
        raise WireGuardError(f"UAPI key must be 64 hex characters, got {len(text)}")
    try:
        return encode_key(bytes.fromhex(text))
    except ValueError:
        raise WireGuardError("UAPI key is not hexadecimal") from None


def uapi_error(code: int) -> str:
    name = errno_mod.errorcode.get(code, "")
    return f"errno {code}" + (f" ({name}: {os.strerror(code)})" if name else "")


# The peer fields of a get=1 reply the agent keeps, and the PeerStatus field each fills.
_UAPI_PEER_INTS = {
    "rx_bytes": "rx_bytes",
    "tx_bytes": "tx_bytes",
    "last_handshake_time_sec": "last_handshake",
    "persistent_keepalive_interval": "persistent_keepalive",
}


def parse_uapi_get(text: str) -> tuple[dict[str, str], dict[str, PeerStatus]]:
    """Parse a ``get=1`` reply (without its ``errno=`` line) into device fields and peers."""
    device: dict[str, str] = {}
    peers: dict[str, PeerStatus] = {}
    key = ""
    allowed: list[str] = []
    fields: dict[str, Any] = {}
    ints = _UAPI_PEER_INTS
    for line in text.split("\n"):
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(f"unexpected UAPI line {line[:80]!r}")
        if name == "public_key":
            if key:
                peers[key] = PeerStatus(key, sorted_networks(allowed), **fields)
            key, allowed, fields = hex_to_key(value), [], {}
        elif not key:
            device[name] = value
        elif name == "allowed_ip":
            allowed.append(value)
        elif name in ints:
            fields[ints[name]] = int(value)
        elif name == "endpoint":
            fields["endpoint"] = value
        # preshared_key, protocol_version, last_handshake_time_nsec: not needed
    if key:
        peers[key] = PeerStatus(key, sorted_networks(allowed), **fields)
    return device, peers


def parse_uapi_peers(
    reply: str | bytes | bytearray, public_keys: Collection[str]
) -> dict[str, PeerStatus]:
    """The peers named by ``public_keys`` (base64) from a ``get=1`` reply, parsing only their
    lines: each peer's part is found by its key and ends where the next peer's begins. Peers the
    reply does not have are left out.

    ``reply`` may be the raw bytes off the socket: only the parts of the peers asked for are
    decoded (a reply for a thousand peers is some 300 kB, and the agent reads it to take the
    last counters of the one peer it is about to remove)."""
    data = reply.encode("utf-8") if isinstance(reply, str) else reply
    size = len(data)
    peers: dict[str, PeerStatus] = {}
    for public_key in public_keys:
        marker = b"public_key=" + key_to_hex(public_key).encode("ascii")
        start = data.find(marker)
        # Only a whole line starts a peer (a preshared key may hold the same hex).
        while start != -1 and not (
            (start == 0 or data[start - 1] == 0x0A)
            and (start + len(marker) == size or data[start + len(marker)] == 0x0A)
        ):
            start = data.find(marker, start + 1)
        if start == -1:
            continue
        end = data.find(b"\npublic_key=", start + len(marker))
        # Cut at "\n" and at an ASCII marker: never inside a multi-byte character, so decoding
        # the part gives what decoding the whole reply would.
        part = data[start:] if end == -1 else data[start:end]
        _, found = parse_uapi_get(bytes(part).decode("utf-8", "replace"))
        peers.update(found)
    return peers
