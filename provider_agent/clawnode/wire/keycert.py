"""Gateway key rotation: ``KeyCert``, the body of a ``molt/key-cert/v1`` message, and the rules
an agent follows a chain of them by (``follow_key_chain``).

A certificate is signed by the gateway key it retires (``old_key``) and names the key that
replaces it (``new_key``), its place in the gateway's history (``sequence``: 1 for the first
rotation, one more for each after) and when it takes effect (``not_before``, Unix seconds). The
gateway sends its whole chain, oldest first, beside the desired state it signs with its current
key; an agent whose pinned key no longer verifies that state follows the chain from its pinned
key and, if the chain holds and the state verifies with the key it ends at, pins that key
(clawnode.daemon). The rules, each refusing the whole chain:

- the chain is a list of at most ``MAX_CHAIN`` envelopes;
- following starts at the pinned key's place: the chain is whole, oldest first (certificate
  n at index n - 1), so for a key pinned at sequence n (told at enrolment, or reached by an
  earlier chain) it is the certificate at index n, which must name the pinned key as
  ``old_key``. Only a pin at sequence 0 whose place may be unknown (an enrolment from before
  the gateway told it) is searched for: the first certificate whose ``old_key`` is the pinned
  key. The certificates before are history, skipped unread;
- from there on, every certificate is signed by the key before it (the pinned key first), names
  it as ``old_key``, and its ``new_key`` is the next one's ``old_key``;
- sequences go up by exactly one from the sequence the agent pinned (from a pin at sequence 0
  found by searching, the first only has to be above it): a certificate the agent has already
  moved past, replayed, or a second one of a sequence (a fork made with a retired key), is
  refused: no rollback;
- no key comes back (a cycle would let a retired key sign again), and ``new_key`` is never
  ``old_key``;
- ``not_before`` is at most ``NOT_BEFORE_SKEW`` seconds ahead of the agent's clock.

There is no expiry: an agent offline for months must still be able to follow the chain, and a
certificate says only "this key replaced that one", which stays true.

Pure: stdlib + PyNaCl, no Django.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from ..keys import encode_key, parse_ed25519_public_key
from . import fields
from .fields import ProtocolError, short
from .schema import Message
from .signing import KEY_CERT, BadSignature, open_envelope

__all__ = ["MAX_CHAIN", "NOT_BEFORE_SKEW", "KeyCert", "follow_key_chain"]

MAX_CHAIN = 64
NOT_BEFORE_SKEW = 300  # seconds: the clocks of gateway and agent may differ this much


@dataclass(frozen=True)
class KeyCert(Message):
    """Body of a KEY_CERT message, signed by ``old_key``: ``new_key`` replaces it."""

    old_key: Annotated[str, fields.ed25519_key]
    new_key: Annotated[str, fields.ed25519_key]
    sequence: Annotated[int, fields.integer(1)]
    not_before: Annotated[int, fields.integer()]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.old_key == self.new_key:
            raise ProtocolError("key certificate names the same key twice", "new_key")


def follow_key_chain(
    pinned_key: bytes, pinned_sequence: int, chain: object, now: int
) -> tuple[bytes, int]:
    """The (key, sequence) the chain leads to from ``pinned_key``, by the rules above.

    Raises BadSignature (a certificate that does not verify) or ProtocolError (anything else)
    naming the certificate; the messages hold keys and numbers only, never anything secret."""
    if not isinstance(chain, Sequence) or isinstance(chain, str | bytes):
        raise ProtocolError("key certificates must be a list")
    if len(chain) > MAX_CHAIN:
        raise ProtocolError(f"more than {MAX_CHAIN} key certificates")
    pinned_b64 = _b64(pinned_key)
    start = _start(chain, pinned_b64, pinned_sequence)
    key, sequence = pinned_key, pinned_sequence
    seen = {pinned_b64}
    for i in range(start, len(chain)):
        cert = _open(chain[i], key, i)
        if cert.old_key != _b64(key):
            raise ProtocolError(f"key certificate {i} does not continue the chain")
        # A pin at sequence 0 may be one whose place is unknown (a join from before the
        # enrolment answer told it, after a rotation): the first certificate followed then only
        # has to be newer. Otherwise, and after it, no gap.
        in_order = (
            cert.sequence > sequence
            if i == start and pinned_sequence == 0
            else cert.sequence == sequence + 1
        )
        if not in_order:
            raise ProtocolError(
                f"key certificate {i} has sequence {cert.sequence} after {sequence}: "
                "a replayed or forked certificate"
            )
        if cert.not_before > now + NOT_BEFORE_SKEW:
            raise ProtocolError(f"key certificate {i} is not valid before {cert.not_before}")
        if cert.new_key in seen:
            raise ProtocolError(f"key certificate {i} brings back a retired key")
        seen.add(cert.new_key)
        key, sequence = parse_ed25519_public_key(cert.new_key), cert.sequence
    return key, sequence


def _start(chain: Sequence[Any], pinned_b64: str, pinned_sequence: int) -> int:
    """Where following begins: the certificate that retires the pinned key.

    The gateway's chain is whole, oldest first, so certificate n is at index n - 1 and the one
    after a key pinned at sequence n is at index n: read there, not searched for. Sequence 0
    is either the key from before any rotation (index 0) or, in an enrolment from before the
    gateway told the sequence, a key pinned at an unknown place: only then is the chain searched
    for the first certificate whose old_key is the pinned key."""
    if pinned_sequence:
        if pinned_sequence >= len(chain):
            raise ProtocolError(
                f"the key certificates end at sequence {len(chain)}, not past the pinned key's "
                f"{pinned_sequence}"
            )
        body = (
            chain[pinned_sequence].get("body")
            if isinstance(chain[pinned_sequence], Mapping)
            else None
        )
        if not isinstance(body, Mapping) or body.get("old_key") != pinned_b64:
            raise ProtocolError(
                f"key certificate {pinned_sequence} does not retire the pinned key "
                f"{pinned_b64[:8]}… (pinned at sequence {pinned_sequence})"
            )
        return pinned_sequence
    for i, envelope in enumerate(chain):
        body = envelope.get("body") if isinstance(envelope, Mapping) else None
        if isinstance(body, Mapping) and body.get("old_key") == pinned_b64:
            return i
    raise ProtocolError(f"no key certificate is signed by the pinned key {pinned_b64[:8]}…")


def _open(envelope: Any, key: bytes, index: int) -> KeyCert:
    try:
        body = open_envelope(envelope, key, KEY_CERT)
    except BadSignature as exc:
        raise BadSignature(f"key certificate {index}: {exc}") from None
    try:
        return KeyCert.from_dict(body)
    except ProtocolError as exc:
        raise ProtocolError(f"key certificate {index}: {short(str(exc), 200)}") from None


def _b64(key: bytes) -> str:
    return encode_key(key)
