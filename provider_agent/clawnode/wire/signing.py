"""Canonical signing of the wire messages: message kinds, the exact bytes signed, envelopes, and
the freshness of what they carry.

Every signed message is signed over ``kind + "\\n" + canonical JSON of body`` (design/network.md,
"Signatures"). The kind names message type and version, so a signature for one kind never
verifies as another. Canonical JSON: keys sorted by code point, no whitespace, UTF-8 (not
\\u-escaped), and only strings, integers, booleans, null, lists and objects. Floats are refused:
their text form differs between languages, so a re-encoding verifier could disagree.

Replay protection is the receiver's job with what the message carries: ``check_fresh`` on a
timestamp plus a remembered nonce, or a monotonic revision.

Pure: stdlib + PyNaCl, no Django.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from typing import Any

import nacl.exceptions
import nacl.signing

from ..keys import Identity
from .fields import MAX_SAFE_INT, ProtocolError, is_int, short

__all__ = [
    "ACK",
    "ACK_V1",
    "AGENT_AUTH",
    "CONNECTIVITY",
    "DESIRED_STATE",
    "ENROLL",
    "KEY_CERT",
    "KINDS",
    "METERING",
    "NAMES",
    "REFUSAL",
    "REMOVED",
    "ROUND_TRIPS",
    "SANDBOX_STATUS",
    "SIGNATURE_LEN",
    "BadSignature",
    "StaleMessage",
    "canonical_bytes",
    "check_fresh",
    "new_nonce",
    "open_envelope",
    "sign",
    "signed_envelope",
    "verify",
]

ENROLL = "molt/enroll/v1"
AGENT_AUTH = "molt/agent-auth/v1"
DESIRED_STATE = "molt/desired-state/v1"
# v2: an ack names the peers still leaving (Ack.removing); their removal is a REMOVED message.
ACK = "molt/ack/v2"
# What agents from before the two-step removal send: the same body without `removing` (they
# removed a peer, its final counters sent, before acknowledging). The gateway still takes it,
# so those agents keep working until they are upgraded; agents never send it any more.
ACK_V1 = "molt/ack/v1"
METERING = "molt/metering/v1"
REMOVED = "molt/removed/v1"
KEY_CERT = "molt/key-cert/v1"
SANDBOX_STATUS = "molt/sandbox-status/v1"
# The gateway's signed word that it refuses this node (revoked or unknown), bound to one
# connection's challenge: the only thing that makes an agent stop for good.
REFUSAL = "molt/refusal/v1"
# What the node's check of its paths over the mesh found (the hub, a peer node).
CONNECTIVITY = "molt/connectivity/v1"
# The round trips of the node's pings to its job peers (clawnode.rtt).
ROUND_TRIPS = "molt/round-trips/v1"

# The names table of a node's DNS responder (clawnode.wire.names), signed by the gateway.
NAMES = "molt/names/v1"
KINDS = frozenset(
    {
        CONNECTIVITY,
        ENROLL,
        AGENT_AUTH,
        DESIRED_STATE,
        ACK,
        ACK_V1,
        METERING,
        REMOVED,
        KEY_CERT,
        SANDBOX_STATUS,
        REFUSAL,
        NAMES,
        ROUND_TRIPS,
    }
)

_MAX_DEPTH = 32  # bodies are shallow; the cap keeps hostile input from exhausting the stack

SIGNATURE_LEN = 64


class BadSignature(Exception):
    """A signed message is not authentic (or not of the expected kind). Fail closed."""


class StaleMessage(Exception):
    """A timestamp is outside the allowed clock skew."""


# -- canonical bytes and signatures -----------------------------------------------------------


def _check_json_value(value: object, path: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"{path} is nested deeper than {_MAX_DEPTH} levels", path)
    # bool is a subclass of int; check it first so it is not range-checked as a number.
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise ProtocolError(
                f"{path} is outside the interoperable integer range (±(2**53-1))", path
            )
        return
    if isinstance(value, str):
        _check_text(value, path)
        return
    if isinstance(value, float):
        raise ProtocolError(f"{path} is a float; the protocol uses integers and strings only", path)
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{path} has a non-string key {short(key)}", path)
            _check_text(key, f"{path} key {short(key)}")
            _check_json_value(item, f"{path}.{key[:64]}", depth + 1)
        return
    raise ProtocolError(f"{path} has unsupported type {type(value).__name__}", path)


def _plainly_canonical(value: object, depth: int) -> bool:
    """True when ``value`` certainly passes _check_json_value, found without building the paths
    its error messages name (a desired state has thousands of values; making a path string per
    value was most of the cost of checking a valid one).

    False means "not sure": anything invalid, but also subclasses, other Mappings and tuples,
    which _check_json_value then judges (and names, when it refuses). Strings are not looked at:
    canonical_bytes finds a lone surrogate when it encodes the whole text.
    """
    if depth > _MAX_DEPTH:
        return False
    kind = type(value)
    if kind is dict:
        if depth == _MAX_DEPTH and value:
            return False  # its items would be nested too deep
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                return False
            item_kind = type(item)
            if item_kind is str or item is None or item_kind is bool:
                continue
            if item_kind is int:
                if not -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                    return False
                continue
            if not _plainly_canonical(item, depth + 1):
                return False
        return True
    if kind is list:
        if depth == _MAX_DEPTH and value:
            return False
        for item in value:  # type: ignore[attr-defined]
            item_kind = type(item)
            if item_kind is str or item is None or item_kind is bool:
                continue
            if item_kind is int:
                if not -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                    return False
                continue
            if not _plainly_canonical(item, depth + 1):
                return False
        return True
    if kind is str or value is None or kind is bool:
        return True
    if kind is int:
        return -MAX_SAFE_INT <= value <= MAX_SAFE_INT  # type: ignore[operator]
    return False


def _check_text(text: str, path: str) -> None:
    # A lone surrogate cannot be encoded as UTF-8; catch it here with a useful path.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{path} is not valid Unicode (lone surrogate)", path) from None


def canonical_bytes(kind: str, body: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed for a message of ``kind`` with ``body``.

    Raises ProtocolError (a ValueError) for an unknown kind or a body that has no canonical
    form (floats, non-string keys, out-of-range integers, other types), naming the path.
    """
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {short(kind)}")
    if not isinstance(body, Mapping):
        raise ProtocolError(f"body must be a JSON object, got {type(body).__name__}")
    if not _plainly_canonical(body, 0):
        _check_json_value(body, "body", 0)
    text = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate in a string or key: the full check finds it and names its path.
        _check_json_value(body, "body", 0)
        raise ProtocolError("body is not valid Unicode (lone surrogate)") from None
    return kind.encode("ascii") + b"\n" + encoded


def sign(identity_or_signing_seed: Identity | bytes, kind: str, body: Mapping[str, Any]) -> str:
    """Base64 Ed25519 signature of ``canonical_bytes(kind, body)``.

    Accepts an Identity or its raw 32-byte seed (e.g. the gateway root key from settings).
    """
    signer = (
        identity_or_signing_seed
        if isinstance(identity_or_signing_seed, Identity)
        else Identity.from_seed(identity_or_signing_seed)
    )
    return base64.b64encode(signer.sign(canonical_bytes(kind, body))).decode("ascii")


def verify(public_key: bytes, kind: str, body: Mapping[str, Any], signature_b64: str) -> None:
    """Check ``signature_b64`` over (kind, body) by ``public_key``; raise BadSignature if not.

    Never raises PyNaCl exceptions. An unknown ``kind`` is the caller's bug and raises
    ProtocolError; a body without canonical form cannot carry a valid signature and raises
    BadSignature.
    """
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {short(kind)}")
    if not isinstance(signature_b64, str):
        raise BadSignature(f"{kind} signature must be a base64 string")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature(f"{kind} signature is not valid base64") from None
    if len(signature) != SIGNATURE_LEN:
        raise BadSignature(
            f"{kind} signature must decode to {SIGNATURE_LEN} bytes, got {len(signature)}"
        )
    # base64 has spare bits, so one signature has several spellings; accept only the canonical
    # one so a signature string can serve as an identifier (e.g. in an audit log) unaltered.
    if base64.b64encode(signature).decode("ascii") != signature_b64:
        raise BadSignature(f"{kind} signature is not canonical base64")
    try:
        message = canonical_bytes(kind, body)
    except ProtocolError as exc:
        raise BadSignature(f"{kind} body cannot be verified: {exc}") from None
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise BadSignature(f"{kind} verify key must be 32 bytes")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        # BadSignatureError for a mismatch; other CryptoErrors for an unusable key.
        raise BadSignature(f"{kind} signature does not match the body for this key") from None


def signed_envelope(kind: str, body: dict[str, Any], signer: Identity) -> dict[str, Any]:
    """``{"kind", "body", "signature"}``, ready for json.dumps."""
    return {"kind": kind, "body": body, "signature": sign(signer, kind, body)}


def open_envelope(
    envelope: Mapping[str, Any], public_key: bytes, expected_kind: str
) -> dict[str, Any]:
    """Verify an envelope of ``expected_kind`` signed by ``public_key``; return its body.

    Raises BadSignature for anything that makes it untrustworthy: malformed envelope, other
    kind, bad or missing signature. Freshness/replay checks are left to the caller.
    """
    if expected_kind not in KINDS:
        raise ProtocolError(f"unknown message kind {short(expected_kind)}")
    if not isinstance(envelope, Mapping):
        raise BadSignature(f"{expected_kind} envelope must be a JSON object")
    extra = set(envelope) - {"kind", "body", "signature"}
    if extra:
        names = ", ".join(sorted(short(k) for k in extra)[:5])
        raise BadSignature(f"{expected_kind} envelope has unexpected fields: {names}")
    kind = envelope.get("kind")
    if kind != expected_kind:
        raise BadSignature(f"expected a {expected_kind} message, got kind {short(kind)}")
    body = envelope.get("body")
    if not isinstance(body, dict):
        raise BadSignature(f"{expected_kind} envelope body must be a JSON object")
    verify(public_key, expected_kind, body, envelope.get("signature"))  # type: ignore[arg-type]
    return body


# -- freshness ----------------------------------------------------------------------------------


def check_fresh(timestamp: int, now: int, max_skew: int = 120) -> None:
    """Refuse a timestamp (Unix seconds) more than ``max_skew`` seconds from ``now``."""
    if not is_int(timestamp):
        raise StaleMessage(f"timestamp must be an integer, got {type(timestamp).__name__}")
    skew = timestamp - now
    if abs(skew) > max_skew:
        direction = "in the future" if skew > 0 else "in the past"
        raise StaleMessage(f"timestamp is {abs(skew)} s {direction} (allowed skew {max_skew} s)")


def new_nonce() -> str:
    """16 random bytes, URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
