"""Canonical CIDR text, with IPv4 recognised without ``ipaddress``: the agent's hot paths.

Every peer's allowed IPs are checked on each desired state (wire.PeerSpec), read back from
the device (backends.uapi.parse_uapi_get) and compared (reconcile.plan). ``ipaddress.ip_network``
costs several microseconds a call, which at a thousand peers was most of a reconcile. Job and
mesh peers have IPv4 networks written canonically (``10.100.128.9/32``), so that case is
recognised here with one regular expression and a little integer arithmetic; anything else (IPv6,
a host part set, leading zeros, a netmask form) returns None and the caller falls back to
``ipaddress``, which stays the authority on what a network is.

Pure: stdlib only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

__all__ = ["ipv4_network_key", "sorted_networks"]

# One octet 0-255, no leading zero ("01" is not canonical; ipaddress refuses it in strict
# parsing anyway). [0-9], not \d: \d matches non-ASCII digits too.
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_CIDR = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}/(3[0-2]|[12]?[0-9])")


def ipv4_network_key(text: str) -> tuple[int, int] | None:
    """(network address as an integer, prefix length) when ``text`` is an IPv4 network written
    exactly as ``str(ipaddress.ip_network(text, strict=True))`` writes it; else None.

    The pair sorts as ``ipaddress.IPv4Network`` objects do (address, then netmask).
    """
    match = _IPV4_CIDR.fullmatch(text)
    if match is None:
        return None
    a, b, c, d, prefix = match.groups()
    value = (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)
    length = int(prefix)
    if value & ((1 << (32 - length)) - 1):
        return None  # host bits set: not a network in strict form
    return value, length


def _network_key(text: str) -> tuple[tuple[int, int, int], str]:
    """(sort key, canonical text) of one network: IPv4 before IPv6, then as ipaddress orders
    networks (address, then prefix length)."""
    fast = ipv4_network_key(text)
    if fast is not None:
        return (4, *fast), text
    network = ipaddress.ip_network(text, strict=False)
    return (network.version, int(network.network_address), network.prefixlen), str(network)


def sorted_networks(networks: Iterable[str]) -> tuple[str, ...]:
    """Networks as canonical text, sorted, without duplicates; a host part is dropped
    (``10.0.0.1/24`` is ``10.0.0.0/24``). Raises ValueError for text that is not a network."""
    if isinstance(networks, (list, tuple)) and len(networks) == 1:
        only = networks[0]
        if ipv4_network_key(only) is not None:
            return (only,)  # a job peer's one canonical network: nothing to parse or sort
    keyed = dict(_network_key(n) for n in networks)
    return tuple(keyed[k] for k in sorted(keyed))
