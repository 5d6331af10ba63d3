"""The names table the gateway signs for a node's DNS responder (clawnode.names): which client
may resolve which names. One ``NameGroup`` per order with a sandbox on the node: its
``clients`` (every sandbox of the order, on any node, and the buyer's tunnel address) may
resolve its ``records`` (``<order>-<n>.molt`` -> that sandbox's address) and nothing else.
Operator groups (``node-<n>.mesh``) have the same shape, with the hub as their client.

Sent as its own signed kind (``molt/names/v1``) in the ``names`` field of the ``desired_state``
frame, not inside DesiredState: a body refuses unknown fields, so a new field there would make
agents that predate names refuse every state; they ignore a frame field they do not read.

Pure: stdlib + PyNaCl, no Django.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated

from . import fields
from .fields import ProtocolError
from .schema import Message, items

__all__ = ["NAME_ZONES", "NameGroup", "NameRecord", "NameTable"]

# The zones the responder answers for: sandboxes of orders, and nodes for operators.
NAME_ZONES = ("molt", "mesh")
MAX_GROUPS = 1024
MAX_RECORDS = 256  # sandboxes of one order
MAX_CLIENTS = 512  # its sandboxes and the buyer's address(es)
# Lower-case LDH labels (RFC 1123), at most 63 each, ending in one of NAME_ZONES.
_NAME_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.){1,4}(?:molt|mesh)")


def _ipv4(value: object, name: str) -> str:
    """One IPv4 host address, written canonically ("10.128.0.33")."""
    text = fields.check_text(value, name, max_len=15)
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise ProtocolError(f"{name} must be an IPv4 address", name) from None
    if str(address) != text:
        raise ProtocolError(f"{name} must be written {str(address)!r}", name)
    return text


def _ipv4s(max_len: int) -> fields.Check:
    def check(value: object, name: str) -> tuple[str, ...]:
        given = fields.sequence(value, name, max_len)
        for i, item in enumerate(given):
            _ipv4(item, f"{name}[{i}]")
        if len(set(given)) != len(given):
            raise ProtocolError(f"{name} has duplicates", name)
        return given

    return check


@dataclass(frozen=True)
class NameRecord(Message):
    """One A record: ``name`` (lower case, e.g. "order-17-0.molt") resolves to ``address``."""

    name: Annotated[str, fields.pattern(_NAME_RE, 253, "a lower-case name in .molt or .mesh")]
    address: Annotated[str, _ipv4]


def _distinct_names(records: tuple[NameRecord, ...], name: str) -> tuple[NameRecord, ...]:
    seen: set[str] = set()
    for i, record in enumerate(records):
        if record.name in seen:
            raise ProtocolError(f"{name}[{i}].name {record.name} is given twice", name)
        seen.add(record.name)
    return records


@dataclass(frozen=True)
class NameGroup(Message):
    """The names ``clients`` may resolve. ``ref``: what the group is ("order:17", "operators")."""

    ref: Annotated[str, fields.text(128)]
    clients: Annotated[tuple[str, ...], _ipv4s(MAX_CLIENTS)]
    records: Annotated[tuple[NameRecord, ...], items(NameRecord, MAX_RECORDS), _distinct_names]


@dataclass(frozen=True)
class NameTable(Message):
    """Body of a NAMES message, signed by the gateway: a node's whole names table at its
    desired ``revision`` (level-triggered like DesiredState: the agent keeps the newest)."""

    node_id: Annotated[str, fields.node_id]
    revision: Annotated[int, fields.integer()]
    groups: Annotated[tuple[NameGroup, ...], items(NameGroup, MAX_GROUPS)]
    issued_at: Annotated[int, fields.integer()]
