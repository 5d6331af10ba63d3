"""Key checks the other apps ask meshnet for, so that only meshnet reaches into the agent's
key module (marketplace -> meshnet -> clawnode, design/architecture.md)."""

from __future__ import annotations

from clawnode.keys import InvalidKey, parse_wireguard_public_key

from meshnet.errors import InvalidPeerKey


def check_wireguard_public_key(public_key: str) -> str:
    """``public_key`` if WireGuard can use it as a peer's key (base64 of 32 bytes, not a
    small-order point); else InvalidPeerKey saying what is wrong with it."""
    try:
        parse_wireguard_public_key(public_key)
    except InvalidKey as exc:
        raise InvalidPeerKey(str(exc)) from None
    return public_key
