"""Isolation of job peers with nftables: one table the agent owns.

A buyer's peer may reach only the provider node's mesh address: never another job's address,
never the provider's LAN, never the internet through the provider. The rules hold for the whole
WireGuard interface, so they need no change when peers come and go (no window in which a new
peer is unfiltered, and no nft call on the per-peer hot path):
- input: a packet arriving on the WireGuard interface is accepted only when it is addressed to
  the node's mesh address (the provider's LAN address is local too, and refused);
- forward: nothing arriving on the WireGuard interface is routed anywhere (another job's peer
  sits on the same interface; the LAN and the internet are beyond it), and nothing is routed
  onto it from elsewhere.
The table is replaced in one `nft -f` transaction, so there is never a moment without rules.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass, field
from typing import Protocol

TABLE = "clawnode"
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class FirewallError(RuntimeError):
    pass


def render_ruleset(interface: str, mesh_address: str) -> str:
    """The whole `inet clawnode` table as an nft script (pure)."""
    if not _IFNAME.fullmatch(interface):
        raise ValueError(f"bad interface name {interface!r}")
    mesh = ipaddress.IPv4Address(mesh_address)
    return (
        # Declaring then deleting makes the script work whether or not the table exists, and
        # nft applies the whole file as one transaction.
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        f"\tchain input {{\n"
        f"\t\ttype filter hook input priority filter; policy accept;\n"
        f'\t\tiifname "{interface}" meta nfproto ipv6 counter drop\n'
        f'\t\tiifname "{interface}" ip daddr != {mesh} counter drop\n'
        f"\t}}\n"
        f"\tchain forward {{\n"
        f"\t\ttype filter hook forward priority filter; policy accept;\n"
        f'\t\tiifname "{interface}" counter drop\n'
        f'\t\toifname "{interface}" counter drop\n'
        f"\t}}\n"
        f"}}\n"
    )


class Firewall(Protocol):
    def apply(self, interface: str, mesh_address: str) -> None: ...

    def remove(self) -> None: ...


class NftFirewall:
    """The real firewall: `nft -f -` with the rendered table."""

    def __init__(self, nft: str = "nft") -> None:
        self.nft = nft

    def _run(self, script: str) -> None:
        result = subprocess.run(
            [self.nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise FirewallError(f"nft refused the ruleset: {result.stderr.strip()}")

    def apply(self, interface: str, mesh_address: str) -> None:
        self._run(render_ruleset(interface, mesh_address))

    def remove(self) -> None:
        self._run(f"table inet {TABLE}\ndelete table inet {TABLE}\n")


@dataclass
class FakeFirewall:
    """Test double with the same interface: remembers what it was asked to enforce."""

    applied: list[tuple[str, str]] = field(default_factory=list)
    removed: bool = False

    def apply(self, interface: str, mesh_address: str) -> None:
        self.applied.append((interface, mesh_address))

    def remove(self) -> None:
        self.removed = True
