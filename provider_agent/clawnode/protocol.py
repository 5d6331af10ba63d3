"""Wire protocol shared by agent and gateway: canonical signing and message types.

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
import dataclasses
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import nacl.exceptions
import nacl.signing

from .cidr import ipv4_network_key
from .keys import (
    Identity,
    InvalidKey,
    parse_ed25519_public_key,
    parse_wireguard_public_key,
)

__all__ = [
    "ACK",
    "ACK_V1",
    "AGENT_AUTH",
    "DESIRED_STATE",
    "ENROLL",
    "KEY_CERT",
    "KINDS",
    "METERING",
    "REMOVED",
    "BadSignature",
    "DesiredState",
    "EnrollRequest",
    "GpuInfo",
    "PeerSpec",
    "ProtocolError",
    "StaleMessage",
    "canonical_bytes",
    "check_fresh",
    "new_nonce",
    "open_envelope",
    "parse_endpoint",
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
KINDS = frozenset({ENROLL, AGENT_AUTH, DESIRED_STATE, ACK, ACK_V1, METERING, REMOVED, KEY_CERT})

# I-JSON (RFC 7493) interoperable integer range: a JavaScript or other double-based parser
# reads these exactly, so a verifier in another language re-encodes the same digits.
MAX_SAFE_INT = 2**53 - 1
_MAX_DEPTH = 32  # bodies are shallow; the cap keeps hostile input from exhausting the stack

SIGNATURE_LEN = 64


class ProtocolError(ValueError):
    """A message or body is malformed.

    ``field`` is the path of the offending field (``"gpus[1].memory_mb"``), also at the start
    of the message; empty when the problem is the whole object.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class BadSignature(Exception):
    """A signed message is not authentic (or not of the expected kind). Fail closed."""


class StaleMessage(Exception):
    """A timestamp is outside the allowed clock skew."""


# -- canonical bytes and signatures -----------------------------------------------------------


def _short(value: object, limit: int = 64) -> str:
    """repr() cut to ``limit`` characters: error messages may quote attacker-supplied text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
                raise ProtocolError(f"{path} has a non-string key {_short(key)}", path)
            _check_text(key, f"{path} key {_short(key)}")
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
        raise ProtocolError(f"unknown message kind {_short(kind)}")
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
        raise ProtocolError(f"unknown message kind {_short(kind)}")
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
        raise ProtocolError(f"unknown message kind {_short(expected_kind)}")
    if not isinstance(envelope, Mapping):
        raise BadSignature(f"{expected_kind} envelope must be a JSON object")
    extra = set(envelope) - {"kind", "body", "signature"}
    if extra:
        names = ", ".join(sorted(_short(k) for k in extra)[:5])
        raise BadSignature(f"{expected_kind} envelope has unexpected fields: {names}")
    kind = envelope.get("kind")
    if kind != expected_kind:
        raise BadSignature(f"expected a {expected_kind} message, got kind {_short(kind)}")
    body = envelope.get("body")
    if not isinstance(body, dict):
        raise BadSignature(f"{expected_kind} envelope body must be a JSON object")
    verify(public_key, expected_kind, body, envelope.get("signature"))  # type: ignore[arg-type]
    return body


# -- freshness ----------------------------------------------------------------------------------


def check_fresh(timestamp: int, now: int, max_skew: int = 120) -> None:
    """Refuse a timestamp (Unix seconds) more than ``max_skew`` seconds from ``now``."""
    if not _is_int(timestamp):
        raise StaleMessage(f"timestamp must be an integer, got {type(timestamp).__name__}")
    skew = timestamp - now
    if abs(skew) > max_skew:
        direction = "in the future" if skew > 0 else "in the past"
        raise StaleMessage(f"timestamp is {abs(skew)} s {direction} (allowed skew {max_skew} s)")


def new_nonce() -> str:
    """16 random bytes, URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")


# -- field validation helpers -------------------------------------------------------------------
#
# Each helper takes the field's name and raises ProtocolError whose message starts with it.

_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22,64}")  # at least 128 bits, as new_nonce() makes
_NODE_ID_RE = re.compile(r"nd_[0-9a-f]{32}")  # keys.node_id_for
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME_RE = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL

PEER_KINDS = ("job", "mesh")


def _is_int(value: object) -> bool:
    # bool is an int subclass; True must not pass as a port or a revision.
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: object, name: str, lo: int = 0, hi: int = MAX_SAFE_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not lo <= value <= hi:
        raise ProtocolError(f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def _str(value: object, name: str, *, max_len: int, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string, got {type(value).__name__}", name)
    if not value and not empty:
        raise ProtocolError(f"{name} must not be empty", name)
    if len(value) > max_len:
        raise ProtocolError(f"{name} is longer than {max_len} characters", name)
    # Control characters have no business in these fields and would corrupt logs and configs.
    if _CONTROL_RE.search(value):
        raise ProtocolError(f"{name} contains control characters", name)
    return value


def _node_id(value: object) -> str:
    """A node id as keys.node_id_for makes it; every message naming a node checks it so."""
    node_id = _str(value, "node_id", max_len=35)
    if not _NODE_ID_RE.fullmatch(node_id):
        raise ProtocolError("node_id must be 'nd_' and 32 lowercase hex digits", "node_id")
    return node_id


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be a boolean, got {type(value).__name__}", name)
    return value


def _tuple(value: object, name: str, max_len: int) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{name} must be a list, got {type(value).__name__}", name)
    if len(value) > max_len:
        raise ProtocolError(f"{name} has more than {max_len} items", name)
    return tuple(value)


def _wireguard_key(value: object, name: str) -> str:
    text = _str(value, name, max_len=44)
    try:
        parse_wireguard_public_key(text)
    except InvalidKey as exc:
        raise ProtocolError(f"{name}: {exc}", name) from None
    return text


def parse_endpoint(value: str) -> tuple[str, int]:
    """Split a WireGuard endpoint ``host:port`` (IPv6 as ``[addr]:port``) into host and port.

    The host is an IPv4 address, a bracketed IPv6 address or a DNS name. Raises ValueError.
    """
    if not isinstance(value, str):
        raise ValueError(f"endpoint must be a string, got {type(value).__name__}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"endpoint {value!r} must be host:port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"endpoint {value!r} port must be between 1 and 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"endpoint {value!r} has an invalid IPv6 address") from None
        return host[1:-1], port
    # An unbracketed IPv6 address fails here too: its colons make the port ambiguous.
    if not _DNS_NAME_RE.fullmatch(host):
        raise ValueError(f"endpoint {value!r} has an invalid host")
    return host, port


def _endpoint(value: object, name: str) -> str:
    text = _str(value, name, max_len=261, empty=True)  # "[" + 45-char IPv6 ... or 253 + ":65535"
    if text:
        try:
            parse_endpoint(text)
        except ValueError as exc:
            raise ProtocolError(f"{name}: {exc}", name) from None
    return text


def _checked_fields(cls: type[Any], data: object) -> dict[str, Any]:
    """Check ``data`` is an object with exactly the dataclass's fields (defaults optional)."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names, required = _field_names(cls)
    # The kind string carries the version, so a new field means a new version: an unknown field
    # is a bug or a forgery, not something to drop silently.
    if not names.issuperset(data):
        for key in data:
            if key not in names:
                raise ProtocolError(
                    f"{_short(key)} is not a field of {cls.__name__}", str(key)[:64]
                )
    for name in required:
        if name not in data:
            raise ProtocolError(f"{name} is required", name)
    return dict(data)


_FIELD_NAMES: dict[type[Any], tuple[frozenset[str], tuple[str, ...]]] = {}


def _field_names(cls: type[Any]) -> tuple[frozenset[str], tuple[str, ...]]:
    """(every field name, the required ones in declaration order) of a message dataclass,
    worked out once per class: a desired state parses a thousand PeerSpecs."""
    cached = _FIELD_NAMES.get(cls)
    if cached is None:
        fields = dataclasses.fields(cls)
        cached = (
            frozenset(f.name for f in fields),
            tuple(
                f.name
                for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ),
        )
        _FIELD_NAMES[cls] = cached
    return cached


def _nested(exc: ProtocolError, prefix: str) -> ProtocolError:
    """Re-raise a nested object's error with its place in the parent (``gpus[1].name``)."""
    if exc.field:
        return ProtocolError(f"{prefix}.{exc}", f"{prefix}.{exc.field}")
    return ProtocolError(f"{prefix}: {exc}", prefix)


def _items(cls: Any, values: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    """Parse each element of a list field with ``cls.from_dict`` (instances pass through)."""
    out = []
    for i, item in enumerate(values):
        try:
            out.append(item if isinstance(item, cls) else cls.from_dict(item))
        except ProtocolError as exc:
            raise _nested(exc, f"{name}[{i}]") from None
    return tuple(out)


# -- message types ------------------------------------------------------------------------------
#
# Constructors validate (in __post_init__), so an instance is valid whether from_dict parsed it
# or gateway code built it. List fields are stored as tuples (hashable, immutable); to_dict emits
# lists, ready for json.dumps and canonical_bytes. Signatures are always checked over the
# received body dict, never over to_dict() of the parsed object.


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mb: int
    uuid: str
    driver_version: str = ""
    cuda_version: str = ""
    simulated: bool = False  # True for the named stand-in used where no NVIDIA GPU exists

    def __post_init__(self) -> None:
        _int(self.index, "index", 0, 1023)
        _str(self.name, "name", max_len=256)
        _int(self.memory_mb, "memory_mb", 0, 2**31 - 1)
        _str(self.uuid, "uuid", max_len=128)
        _str(self.driver_version, "driver_version", max_len=64, empty=True)
        _str(self.cuda_version, "cuda_version", max_len=64, empty=True)
        _bool(self.simulated, "simulated")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuInfo:
        return cls(**_checked_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EnrollRequest:
    """Body of an ENROLL message, signed by the new node's identity key."""

    token: str
    identity_public_key: str  # base64 Ed25519
    wireguard_public_key: str  # base64 X25519
    hostname: str
    listen_port: int
    endpoint: str  # "" (gateway uses the source address it sees) or host:port
    gpus: tuple[GpuInfo, ...]
    timestamp: int  # Unix seconds; with nonce, for replay refusal (check_fresh)
    nonce: str

    def __post_init__(self) -> None:
        _str(self.token, "token", max_len=256)
        _str(self.identity_public_key, "identity_public_key", max_len=44)
        try:
            parse_ed25519_public_key(self.identity_public_key)
        except InvalidKey as exc:
            raise ProtocolError(f"identity_public_key: {exc}", "identity_public_key") from None
        _wireguard_key(self.wireguard_public_key, "wireguard_public_key")
        _str(self.hostname, "hostname", max_len=253)
        _int(self.listen_port, "listen_port", 1, 65535)
        _endpoint(self.endpoint, "endpoint")
        gpus = _tuple(self.gpus, "gpus", 64)
        for i, gpu in enumerate(gpus):
            if not isinstance(gpu, GpuInfo):
                raise ProtocolError(f"gpus[{i}] must be a GpuInfo", f"gpus[{i}]")
        object.__setattr__(self, "gpus", gpus)
        _int(self.timestamp, "timestamp")
        nonce = _str(self.nonce, "nonce", max_len=64)
        if not _NONCE_RE.fullmatch(nonce):
            raise ProtocolError("nonce must be 22-64 URL-safe base64 characters", "nonce")

    @property
    def identity_key(self) -> bytes:
        return parse_ed25519_public_key(self.identity_public_key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnrollRequest:
        fields = _checked_fields(cls, data)
        fields["gpus"] = _items(GpuInfo, _tuple(fields["gpus"], "gpus", 64), "gpus")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["gpus"] = [gpu.to_dict() for gpu in self.gpus]
        return out


@dataclass(frozen=True)
class PeerSpec:
    """One WireGuard peer a node should have."""

    public_key: str  # base64 X25519
    allowed_ips: tuple[str, ...]  # canonical CIDR strings, e.g. "10.100.128.9/32"
    kind: Literal["job", "mesh"]
    ref: str  # what the peer is for: an order id (job) or a node id (mesh)
    endpoint: str = ""
    persistent_keepalive: int = 0  # seconds; 0 = off

    def __post_init__(self) -> None:
        _wireguard_key(self.public_key, "public_key")
        allowed = _tuple(self.allowed_ips, "allowed_ips", 256)
        if not allowed:
            raise ProtocolError("allowed_ips must not be empty", "allowed_ips")
        for i, text in enumerate(allowed):
            if type(text) is str and ipv4_network_key(text) is not None:
                continue  # canonical IPv4 (what ip_network and the spelling check below accept)
            name = f"allowed_ips[{i}]"
            _str(text, name, max_len=43)
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError as exc:
                raise ProtocolError(f"{name}: {exc}", name) from None
            # One spelling per network: the agent compares desired with actual as strings.
            if str(network) != text:
                raise ProtocolError(f"{name} must be written {str(network)!r}", name)
        if len(set(allowed)) != len(allowed):
            raise ProtocolError("allowed_ips has duplicates", "allowed_ips")
        object.__setattr__(self, "allowed_ips", allowed)
        if self.kind not in PEER_KINDS:
            raise ProtocolError(f"kind must be 'job' or 'mesh', got {self.kind!r}", "kind")
        _str(self.ref, "ref", max_len=128)
        _endpoint(self.endpoint, "endpoint")
        _int(self.persistent_keepalive, "persistent_keepalive", 0, 65535)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerSpec:
        return cls(**_checked_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["allowed_ips"] = list(self.allowed_ips)
        return out

    def written_as(self, data: object) -> bool:
        """Whether ``data`` is exactly this peer as JSON carries it: a dict of all six fields,
        each of the JSON type (str, list of str, int) and equal to this peer's value.

        from_dict of such data gives a PeerSpec equal to this one (checking is a function of
        those values alone), so a parser that already checked this one may take it instead:
        DesiredState.from_dict(..., known=) with the previous state, where most peers are
        unchanged from one revision to the next.
        """
        if type(data) is not dict or len(data) != 6:
            return False
        try:
            public_key, allowed = data["public_key"], data["allowed_ips"]
            kind, ref, endpoint = data["kind"], data["ref"], data["endpoint"]
            keepalive = data["persistent_keepalive"]
        except KeyError:
            return False
        return (
            type(public_key) is str
            and public_key == self.public_key
            and type(allowed) is list
            and len(allowed) == len(self.allowed_ips)
            and all(type(text) is str for text in allowed)
            and tuple(allowed) == self.allowed_ips
            and type(kind) is str
            and kind == self.kind
            and type(ref) is str
            and ref == self.ref
            and type(endpoint) is str
            and endpoint == self.endpoint
            and type(keepalive) is int
            and keepalive == self.persistent_keepalive
        )


@dataclass(frozen=True)
class DesiredState:
    """Body of a DESIRED_STATE message: the full peer set of one node, signed by the gateway.

    Level-triggered: the agent keeps the highest revision it has applied and ignores lower ones.
    """

    node_id: str
    revision: int
    peers: tuple[PeerSpec, ...]
    issued_at: int  # Unix seconds

    def __post_init__(self) -> None:
        _node_id(self.node_id)
        _int(self.revision, "revision")
        peers = _tuple(self.peers, "peers", 65535)
        keys: set[str] = set()
        networks: set[str] = set()
        for i, peer in enumerate(peers):
            if not isinstance(peer, PeerSpec):
                raise ProtocolError(f"peers[{i}] must be a PeerSpec", f"peers[{i}]")
            # WireGuard keeps one peer per key and one owner per allowed network (the later
            # peer silently takes it over), so duplicates would misroute traffic.
            if peer.public_key in keys:
                raise ProtocolError(
                    f"peers[{i}].public_key is already used by another peer",
                    f"peers[{i}].public_key",
                )
            keys.add(peer.public_key)
            for net in peer.allowed_ips:
                if net in networks:
                    raise ProtocolError(
                        f"peers[{i}].allowed_ips {net} is already routed to another peer",
                        f"peers[{i}].allowed_ips",
                    )
                networks.add(net)
        object.__setattr__(self, "peers", peers)
        _int(self.issued_at, "issued_at")

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, known: DesiredState | None = None
    ) -> DesiredState:
        """Parse and check ``data``. ``known``: an earlier state already checked (the agent's
        last one); a peer written exactly as one of its peers (PeerSpec.written_as) is taken
        from it instead of being checked again. What is accepted or refused is the same."""
        fields = _checked_fields(cls, data)
        items = _tuple(fields["peers"], "peers", 65535)
        if known is not None and known.peers:
            previous = {peer.public_key: peer for peer in known.peers}
            items = tuple(_known_peer(item, previous) for item in items)
        fields["peers"] = _items(PeerSpec, items, "peers")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "revision": self.revision,
            "peers": [peer.to_dict() for peer in self.peers],
            "issued_at": self.issued_at,
        }


def _known_peer(item: object, previous: Mapping[str, PeerSpec]) -> object:
    """The checked PeerSpec ``item`` is written as, else ``item`` itself (to be checked)."""
    if type(item) is dict:
        key = item.get("public_key")
        if type(key) is str:
            spec = previous.get(key)
            if spec is not None and spec.written_as(item):
                return spec
    return item


# -- the agent channel (websocket /ws/agent/) ---------------------------------------------------
#
# Frames are JSON objects with a "type". Gateway -> agent: "challenge" {challenge, server_time},
# "welcome" {node_id, name, mesh_address}, "desired_state" {envelope: signed DESIRED_STATE},
# "error" {detail}. Agent -> gateway: "auth" {envelope: signed AGENT_AUTH}, "heartbeat" {},
# "inventory" {gpus, reason}, "ack" {envelope: signed ACK}, "metering" {envelope: signed METERING},
# "removed" {envelope: signed REMOVED}.

# Close codes the gateway uses, so an agent can tell "retry later" from "give up".
CLOSE_BAD_MESSAGE = 4400
CLOSE_AUTH_FAILED = 4401
CLOSE_FORBIDDEN = 4403  # unknown or revoked node: re-enrol
CLOSE_AUTH_TIMEOUT = 4408

_CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 random bytes, urlsafe b64 unpadded


@dataclass(frozen=True)
class AgentAuth:
    """Body of an AGENT_AUTH message: the node proves its identity by signing the gateway's
    per-connection challenge, so a recorded answer is useless on any other connection."""

    node_id: str
    challenge: str
    timestamp: int

    def __post_init__(self) -> None:
        _node_id(self.node_id)
        if not _CHALLENGE_RE.fullmatch(_str(self.challenge, "challenge", max_len=43)):
            raise ProtocolError("challenge must be 43 URL-safe base64 characters", "challenge")
        _int(self.timestamp, "timestamp")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentAuth:
        return cls(**_checked_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PeerResult:
    """How applying one peer of a desired state went."""

    public_key: str
    ok: bool
    detail: str = ""

    def __post_init__(self) -> None:
        _wireguard_key(self.public_key, "public_key")
        _bool(self.ok, "ok")
        _str(self.detail, "detail", max_len=500, empty=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerResult:
        return cls(**_checked_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Ack:
    """Body of an ACK message: the agent applied desired state `revision`, peer by peer.

    `results` covers the peers the revision changed; a desired peer left out is one the
    interface already had as desired. `removing` names every peer still on the interface that
    the revision no longer has: cut off, but its final counters not yet read, so the gateway
    neither settles it nor closes its key until a REMOVED message names it. A peer the
    revision took off that is in neither list is gone from the interface."""

    node_id: str
    revision: int
    results: tuple[PeerResult, ...]
    timestamp: int
    removing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _node_id(self.node_id)
        _int(self.revision, "revision")
        results = _tuple(self.results, "results", 65535)
        for i, result in enumerate(results):
            if not isinstance(result, PeerResult):
                raise ProtocolError(f"results[{i}] must be a PeerResult", f"results[{i}]")
        object.__setattr__(self, "results", results)
        _int(self.timestamp, "timestamp")
        object.__setattr__(self, "removing", _keys(self.removing, "removing"))

    @property
    def failed_keys(self) -> frozenset[str]:
        return frozenset(r.public_key for r in self.results if not r.ok)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ack:
        fields = _checked_fields(cls, data)
        fields["results"] = _items(
            PeerResult, _tuple(fields["results"], "results", 65535), "results"
        )
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "revision": self.revision,
            "results": [r.to_dict() for r in self.results],
            "timestamp": self.timestamp,
            "removing": list(self.removing),
        }


@dataclass(frozen=True)
class Removed:
    """Body of a REMOVED message: these peers, once named in an ack's `removing`, are off the
    interface now. Their final counters went in a metering sample sent before this message."""

    node_id: str
    public_keys: tuple[str, ...]
    timestamp: int

    def __post_init__(self) -> None:
        _node_id(self.node_id)
        keys = _keys(self.public_keys, "public_keys")
        if not keys:
            raise ProtocolError("public_keys must name at least one peer", "public_keys")
        object.__setattr__(self, "public_keys", keys)
        _int(self.timestamp, "timestamp")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Removed:
        return cls(**_checked_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "public_keys": list(self.public_keys),
            "timestamp": self.timestamp,
        }


def _keys(value: object, name: str) -> tuple[str, ...]:
    """A list of distinct WireGuard public keys."""
    keys = _tuple(value, name, 65535)
    for i, key in enumerate(keys):
        _wireguard_key(key, f"{name}[{i}]")
    if len(set(keys)) != len(keys):
        raise ProtocolError(f"{name} names a key twice", name)
    return keys


@dataclass(frozen=True)
class PeerCounters:
    """Cumulative WireGuard counters of one peer. `epoch` changes whenever the counters restart
    from zero (peer re-added or re-keyed, interface recreated), so a reset is never mistaken
    for traffic."""

    public_key: str
    epoch: int
    rx_bytes: int
    tx_bytes: int

    def __post_init__(self) -> None:
        _wireguard_key(self.public_key, "public_key")
        _int(self.epoch, "epoch")
        _int(self.rx_bytes, "rx_bytes")
        _int(self.tx_bytes, "tx_bytes")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerCounters:
        return cls(**_checked_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MeteringSample:
    """Body of a METERING message, signed by the node identity so a bill can be proved.
    (`boot_id`, `seq`) names the sample: a resent sample is stored once."""

    node_id: str
    boot_id: str
    seq: int
    sampled_at: int
    peers: tuple[PeerCounters, ...]

    def __post_init__(self) -> None:
        _node_id(self.node_id)
        if not _NONCE_RE.fullmatch(_str(self.boot_id, "boot_id", max_len=64)):
            raise ProtocolError("boot_id must be 22-64 URL-safe base64 characters", "boot_id")
        _int(self.seq, "seq")
        _int(self.sampled_at, "sampled_at")
        peers = _tuple(self.peers, "peers", 65535)
        for i, peer in enumerate(peers):
            if not isinstance(peer, PeerCounters):
                raise ProtocolError(f"peers[{i}] must be a PeerCounters", f"peers[{i}]")
        object.__setattr__(self, "peers", peers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MeteringSample:
        fields = _checked_fields(cls, data)
        fields["peers"] = _items(PeerCounters, _tuple(fields["peers"], "peers", 65535), "peers")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["peers"] = [p.to_dict() for p in self.peers]
        return out
