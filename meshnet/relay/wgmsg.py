"""WireGuard's wire messages, as far as a relay that holds no key can read them (pure).

Every message starts with a little-endian u32 whose low byte is the type and whose other three
bytes are zero (the WireGuard paper, section 5.4):

- 1 handshake initiation, 148 bytes: type, sender index, ephemeral, static (sealed), timestamp
  (sealed), mac1, mac2;
- 2 handshake response, 92 bytes: type, sender index, receiver index, ephemeral, empty
  (sealed), mac1, mac2;
- 3 cookie reply, 64 bytes: type, receiver index, nonce, cookie (sealed);
- 4 transport data, 32 bytes or more: type, receiver index, counter, sealed packet (a
  keepalive is the 32-byte empty one). The packet is padded to a multiple of 16 but never past
  the interface's MTU, so a full-size one is not a multiple of 16 (1452 bytes at MTU 1420).

mac1 is a keyed BLAKE2s over the message up to mac1, keyed by a hash of the *recipient's
public* key, so anyone who knows that public key can check it; WireGuard designed it so that
a responder can drop garbage before any Diffie-Hellman. The relay knows both peers' public
keys (never a private one) and drops handshake messages not meant for the other side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE = 148, 92, 64
TRANSPORT_MIN_SIZE = 32
# Where mac1 starts: the bytes before it are what mac1 covers.
_MAC1_AT = {INITIATION: INITIATION_SIZE - 32, RESPONSE: RESPONSE_SIZE - 32}
_LABEL_MAC1 = b"mac1----"


@dataclass(frozen=True)
class Message:
    type: int
    sender: int | None  # the sender's index (handshake messages)
    receiver: int | None  # the index the recipient chose (all but initiations)


def parse(data: bytes) -> Message | None:
    """The message `data` is, or None when it cannot be a WireGuard message."""
    if len(data) < 4 or data[1:4] != b"\0\0\0":
        return None
    kind = data[0]
    if kind == INITIATION and len(data) == INITIATION_SIZE:
        return Message(kind, struct.unpack_from("<I", data, 4)[0], None)
    if kind == RESPONSE and len(data) == RESPONSE_SIZE:
        sender, receiver = struct.unpack_from("<II", data, 4)
        return Message(kind, sender, receiver)
    if kind == COOKIE_REPLY and len(data) == COOKIE_REPLY_SIZE:
        return Message(kind, None, struct.unpack_from("<I", data, 4)[0])
    if kind == TRANSPORT and len(data) >= TRANSPORT_MIN_SIZE:
        return Message(kind, None, struct.unpack_from("<I", data, 4)[0])
    return None


def counter(data: bytes) -> int:
    """A transport message's counter (its nonce, cleartext): WireGuard's sender counts up from 0
    per session and its receiver refuses a counter it has seen, so a copy of a packet carries
    a counter already seen."""
    return struct.unpack_from("<Q", data, 8)[0]


def mac1_key(public_key_b64: str) -> bytes:
    """HASH(LABEL_MAC1 || recipient's public key): the key of every mac1 sent to that peer."""
    public = base64.b64decode(public_key_b64, validate=True)
    if len(public) != 32:
        raise ValueError("a WireGuard public key is 32 bytes")
    return hashlib.blake2s(_LABEL_MAC1 + public).digest()


def mac1_valid(data: bytes, key: bytes) -> bool:
    """Whether a handshake message's mac1 was made for the recipient whose mac1_key is `key`.
    Transport and cookie messages carry no mac1 and pass."""
    at = _MAC1_AT.get(data[0]) if data else None
    if at is None:
        return True
    expected = hashlib.blake2s(data[:at], key=key, digest_size=16).digest()
    return hmac.compare_digest(expected, data[at : at + 16])
