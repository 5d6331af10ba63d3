"""Field checks of the wire types: each takes a value and its field's name, returns the value as
the message keeps it (a list as a tuple), or raises ProtocolError whose message starts with the
name.

A check is ``check(value, name)``; the parameterised ones are made by a factory
(``integer(1, 65535)``, ``text(256)``), the others are used as they are (``node_id``). Message
types name their checks on each field (clawnode.wire.schema).

Pure: stdlib + PyNaCl, no Django.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from ..cidr import ipv4_network_key
from ..keys import InvalidKey, parse_ed25519_public_key, parse_wireguard_public_key

__all__ = [
    "MAX_SAFE_INT",
    "NONCE_RE",
    "Check",
    "ProtocolError",
    "boolean",
    "choice",
    "distinct_keys",
    "ed25519_key",
    "endpoint",
    "hidden_format_character",
    "integer",
    "is_int",
    "networks",
    "node_id",
    "parse_endpoint",
    "pattern",
    "sequence",
    "short",
    "text",
    "wireguard_key",
]

# I-JSON (RFC 7493) interoperable integer range: a JavaScript or other double-based parser
# reads these exactly, so a verifier in another language re-encodes the same digits.
MAX_SAFE_INT = 2**53 - 1

NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22,64}")  # at least 128 bits, as signing.new_nonce makes
_NODE_ID_RE = re.compile(r"nd_[0-9a-f]{32}")  # keys.node_id_for
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME_RE = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL
# Invisible format characters (Unicode category Cf): the bidi embeddings, overrides and isolates
# (U+202A-U+202E, U+2066-U+2069), marks (U+200E, U+200F, U+061C), zero-width space and joiners,
# U+2060-U+2064, U+FEFF... They can make a name read as something else on a page ("‮gnp.exe").
# Kept: the zero-width non-joiner and joiner (U+200C, U+200D), which Persian and Indic scripts
# need to spell words and which reorder nothing.
_KEPT_FORMAT = frozenset("\u200c\u200d")


def hidden_format_character(value: str) -> str | None:
    """The first invisible format character in ``value``, as ``U+XXXX``; None when it has none."""
    if value.isascii():  # the common case, and ASCII has none: no per-character look-up
        return None
    for char in value:
        if unicodedata.category(char) == "Cf" and char not in _KEPT_FORMAT:
            return f"U+{ord(char):04X}"
    return None


Check = Callable[[Any, str], Any]


class ProtocolError(ValueError):
    """A message or body is malformed.

    ``field`` is the path of the offending field (``"gpus[1].memory_mb"``), also at the start
    of the message; empty when the problem is the whole object.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def short(value: object, limit: int = 64) -> str:
    """repr() cut to ``limit`` characters: error messages may quote attacker-supplied text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: object) -> bool:
    # bool is an int subclass; True must not pass as a port or a revision.
    return isinstance(value, int) and not isinstance(value, bool)


# -- the checks every field type is made of ---------------------------------------------------


def check_int(value: object, name: str, lo: int = 0, hi: int = MAX_SAFE_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not lo <= value <= hi:
        raise ProtocolError(f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def check_text(value: object, name: str, *, max_len: int, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string, got {type(value).__name__}", name)
    if not value and not empty:
        raise ProtocolError(f"{name} must not be empty", name)
    if len(value) > max_len:
        raise ProtocolError(f"{name} is longer than {max_len} characters", name)
    # Control characters have no business in these fields and would corrupt logs and configs.
    if _CONTROL_RE.search(value):
        raise ProtocolError(f"{name} contains control characters", name)
    hidden = hidden_format_character(value)
    if hidden:
        raise ProtocolError(f"{name} contains an invisible format character ({hidden})", name)
    return value


def sequence(value: object, name: str, max_len: int) -> tuple[Any, ...]:
    """A list (or tuple) of at most ``max_len`` items, as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{name} must be a list, got {type(value).__name__}", name)
    if len(value) > max_len:
        raise ProtocolError(f"{name} has more than {max_len} items", name)
    return tuple(value)


# -- checks to name on a field -------------------------------------------------------------------


def integer(lo: int = 0, hi: int = MAX_SAFE_INT) -> Check:
    """An integer (not a boolean) from ``lo`` to ``hi``."""

    def check(value: object, name: str) -> int:
        return check_int(value, name, lo, hi)

    return check


def text(max_len: int, *, empty: bool = False) -> Check:
    """A string of at most ``max_len`` characters, no control characters; "" only if ``empty``."""

    def check(value: object, name: str) -> str:
        return check_text(value, name, max_len=max_len, empty=empty)

    return check


def pattern(regex: re.Pattern[str], max_len: int, what: str) -> Check:
    """A string ``regex`` matches whole; refused as "``name`` must be ``what``"."""

    def check(value: object, name: str) -> str:
        if not regex.fullmatch(check_text(value, name, max_len=max_len)):
            raise ProtocolError(f"{name} must be {what}", name)
        return value  # type: ignore[return-value]  # check_text proved it a str

    return check


def choice(*options: str) -> Check:
    """One of ``options``."""
    spelled = " or ".join(repr(option) for option in options)

    def check(value: object, name: str) -> str:
        if value not in options:
            raise ProtocolError(f"{name} must be {spelled}, got {value!r}", name)
        return value  # type: ignore[return-value]  # one of the strings in options

    return check


def boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be a boolean, got {type(value).__name__}", name)
    return value


def node_id(value: object, name: str) -> str:
    """A node id as keys.node_id_for makes it; every message naming a node checks it so."""
    checked = check_text(value, name, max_len=35)
    if not _NODE_ID_RE.fullmatch(checked):
        raise ProtocolError(f"{name} must be 'nd_' and 32 lowercase hex digits", name)
    return checked


def wireguard_key(value: object, name: str) -> str:
    """A base64 X25519 public key WireGuard can use (keys.parse_wireguard_public_key)."""
    checked = check_text(value, name, max_len=44)
    try:
        parse_wireguard_public_key(checked)
    except InvalidKey as exc:
        raise ProtocolError(f"{name}: {exc}", name) from None
    return checked


def ed25519_key(value: object, name: str) -> str:
    """A base64 Ed25519 public key (a node identity)."""
    checked = check_text(value, name, max_len=44)
    try:
        parse_ed25519_public_key(checked)
    except InvalidKey as exc:
        raise ProtocolError(f"{name}: {exc}", name) from None
    return checked


def distinct_keys(value: object, name: str) -> tuple[str, ...]:
    """A list of distinct WireGuard public keys."""
    keys = sequence(value, name, 65535)
    for i, key in enumerate(keys):
        wireguard_key(key, f"{name}[{i}]")
    if len(set(keys)) != len(keys):
        raise ProtocolError(f"{name} names a key twice", name)
    return keys


def networks(max_len: int) -> Check:
    """A non-empty list of distinct networks, each written canonically ("10.100.128.9/32")."""

    def check(value: object, name: str) -> tuple[str, ...]:
        allowed = sequence(value, name, max_len)
        if not allowed:
            raise ProtocolError(f"{name} must not be empty", name)
        for i, item in enumerate(allowed):
            if type(item) is str and ipv4_network_key(item) is not None:
                continue  # canonical IPv4 (what ip_network and the spelling check below accept)
            place = f"{name}[{i}]"
            check_text(item, place, max_len=43)
            try:
                network = ipaddress.ip_network(item, strict=True)
            except ValueError as exc:
                raise ProtocolError(f"{place}: {exc}", place) from None
            # One spelling per network: the agent compares desired with actual as strings.
            if str(network) != item:
                raise ProtocolError(f"{place} must be written {str(network)!r}", place)
        if len(set(allowed)) != len(allowed):
            raise ProtocolError(f"{name} has duplicates", name)
        return allowed

    return check


def integers(lo: int, hi: int, max_len: int) -> Check:
    """A list of at most ``max_len`` distinct integers, each from ``lo`` to ``hi``."""

    def check(value: object, name: str) -> tuple[int, ...]:
        values = sequence(value, name, max_len)
        for i, item in enumerate(values):
            check_int(item, f"{name}[{i}]", lo, hi)
        if len(set(values)) != len(values):
            raise ProtocolError(f"{name} has duplicates", name)
        return values

    return check


def texts(regex: re.Pattern[str], max_len: int, max_items: int, what: str) -> Check:
    """A list of at most ``max_items`` strings, each one ``regex`` matches whole."""
    one = pattern(regex, max_len, what)

    def check(value: object, name: str) -> tuple[str, ...]:
        values = sequence(value, name, max_items)
        for i, item in enumerate(values):
            one(item, f"{name}[{i}]")
        return values

    return check


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


def endpoint(value: object, name: str) -> str:
    """Empty (not known yet) or a WireGuard endpoint host:port (parse_endpoint)."""
    checked = check_text(value, name, max_len=261, empty=True)  # "[" + 45-char IPv6 ... ":65535"
    if checked:
        try:
            parse_endpoint(checked)
        except ValueError as exc:
            raise ProtocolError(f"{name}: {exc}", name) from None
    return checked
