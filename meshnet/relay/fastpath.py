"""The kernel fast path: nftables rules that forward a known pair without Python (pure render,
plus the one call that applies it).

Once both sides of a pair have handshaken through the relay, the relay installs, for that pair
(relay address R, buyer at B:b sending to R:bp, provider at P:p sending to R:pp):

- raw prerouting: transport data (WireGuard message type 4, the first byte of the UDP
  payload) from exactly B:b to R:bp, or from P:p to R:pp, is tracked in a conntrack zone of
  its own (`ct zone set Z`); every other packet to the relay's ports is `notrack`, and so are
  the relay's own sends from them: Python's flows never create conntrack state, so a new
  source always reaches the Python socket, and no stale entry can capture a pair's packets
  after its rules change. Handshake messages are never tracked, even from the known
  addresses: Python sees every handshake (one per pair every 2 minutes, WireGuard's rekey), so
  it knows each session's indexes (pairs.py), which is what lets a side that moved be found on
  its next packet;
- nat prerouting: B:b -> R:bp is `dnat`ed to P:p, P:p -> R:pp to B:b;
- nat postrouting: in zone Z, the forwarded packet leaves from R:pp toward P (from R:bp toward
  B), so each side keeps seeing the relay port it sends to;
- filter forward: only what these rules dnat'ed is forwarded; the relay host routes nothing
  else (it needs net.ipv4.ip_forward=1 for the fast path).

The first packet of a flow picks the rule; conntrack then forwards every later packet both
ways in the kernel (the reply direction is the other side's traffic). When a side moves, the
pair gets a new zone: entries of the old zone can never match again and expire on their own
(no conntrack tool or flush needed). A side's packets from a new address match no rule and
reach Python: its data, when pairs.py moves the side on it, gives the pair a new route at
once; its handshake takes the pair off the fast path until the handshake completes, so that
Python sees the answer.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

TABLE = "molt_relay"
# The first byte of the UDP payload (bit 64 of the transport header) is WireGuard's message
# type: 4, transport data. Only it goes through the kernel; handshakes go to Python.
TRANSPORT_ONLY = "@th,64,8 4"


@dataclass(frozen=True)
class Route:
    """One pair the kernel forwards."""

    zone: int  # 1..65535, unique among installed routes
    buyer_port: int
    provider_port: int
    buyer: tuple[str, int]
    provider: tuple[str, int]


def ruleset(relay_address: str, port_range: tuple[int, int], routes: list[Route]) -> str:
    """The relay's whole table; `nft -f` replaces it in one transaction."""
    low, high = port_range
    ports = f"{low}-{high}"
    track: list[str] = []
    dnat: list[str] = []
    snat: list[str] = []
    counters: list[str] = []
    for route in routes:
        b_ip, b_port = route.buyer
        p_ip, p_port = route.provider
        z = route.zone
        track += [
            f"    ip saddr {b_ip} udp sport {b_port} udp dport {route.buyer_port} "
            f"{TRANSPORT_ONLY} ct zone set {z} accept",
            f"    ip saddr {p_ip} udp sport {p_port} udp dport {route.provider_port} "
            f"{TRANSPORT_ONLY} ct zone set {z} accept",
        ]
        dnat += [
            f"    ct zone {z} ip saddr {b_ip} udp sport {b_port} udp dport {route.buyer_port} "
            f"dnat to {p_ip}:{p_port}",
            f"    ct zone {z} ip saddr {p_ip} udp sport {p_port} "
            f"udp dport {route.provider_port} dnat to {b_ip}:{b_port}",
        ]
        snat += [
            f"    ct zone {z} ip daddr {p_ip} udp dport {p_port} "
            f"snat to {relay_address}:{route.provider_port}",
            f"    ct zone {z} ip daddr {b_ip} udp dport {b_port} "
            f"snat to {relay_address}:{route.buyer_port}",
        ]
        # Bytes the kernel forwarded for this pair (both ways): the relay's load.
        counters.append(f'    ct zone {z} counter comment "zone-{z}"')
    lines = [
        f"table ip {TABLE} {{",
        "  chain raw_in {",
        "    type filter hook prerouting priority raw; policy accept;",
        f"    ip daddr {relay_address} udp dport {ports} jump pairs",
        "  }",
        "  chain pairs {",
        *track,
        "    notrack",
        "  }",
        "  chain raw_out {",
        "    type filter hook output priority raw; policy accept;",
        f"    ip saddr {relay_address} udp sport {ports} notrack",
        "  }",
        "  chain nat_in {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        *dnat,
        "  }",
        "  chain nat_out {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *snat,
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        *counters,
        "    ct status dnat ct zone != 0 accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply(text: str) -> None:
    """Replace the relay's table with `text` in one nft transaction."""
    script = f"table ip {TABLE}\ndelete table ip {TABLE}\n{text}"
    result = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10
    )
    if result.returncode != 0:
        raise RuntimeError(f"nft failed: {result.stderr.strip()}")


def remove() -> None:
    subprocess.run(
        ["nft", "delete", "table", "ip", TABLE], capture_output=True, text=True, timeout=10
    )


def forwarded_bytes() -> dict[int, int]:
    """Bytes the kernel forwarded per zone, from the forward chain's counters."""
    result = subprocess.run(
        ["nft", "list", "chain", "ip", TABLE, "forward"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    totals: dict[int, int] = {}
    for line in result.stdout.splitlines():
        words = line.split()
        if "zone" in words and "bytes" in words and words[0] == "ct":
            totals[int(words[2])] = int(words[words.index("bytes") + 1])
    return totals
