"""Isolation of job peers and job sandboxes with nftables: one table the agent owns.

A buyer's peer reaches its own job's sandbox only (clawnode.sandbox.network): never the host
(its mesh address, its LAN address, any of its services), another job's address or sandbox, the
provider's LAN, or the internet through the provider. A sandbox reaches neither the host, nor
the LAN and private ranges, nor another sandbox; it reaches the internet, through masquerade
behind the node's address, only when its spec allows egress. Replies (conntrack established)
pass back the way their connection was allowed.

- input: from the WireGuard interface, a peer that owns a sandbox reaches nothing of the host
  (only the echo replies to the agent's own pings of it come back in: clawnode.rtt);
  any other peer (the gateway hub, a mesh peer, a job listed before sandboxes: transitional)
  only the node's mesh address. From a sandbox's veth, only replies to the host's own
  connections (its readiness probe of sshd) are taken.
- forward: from the WireGuard interface only (peer address, sandbox address) pairs of the
  desired state, onto that sandbox's veth; back only their replies. Nothing else is routed from
  or onto the tunnel or a sandbox, except a sandbox with egress out to non-private addresses
  and the replies to it.
- the job's private network (a multi-node order, docs/network.md): a sandbox and the members
  of its own order's network (SandboxRule.mesh: its order's other sandboxes, on other nodes
  through their node-to-node peer, or on this node) reach each other both ways, as (sandbox,
  member) pairs; nothing else of a sandbox reaches a member's, and a member's address reaches
  nothing of the host (input). WireGuard accepts from a node-to-node peer only the sources it
  routes (its node's sandboxes of orders shared with this node), so the other node itself, its
  LAN and its other sandboxes get nothing through it either. Several orders across the same
  two nodes share one peer (WireGuard has one per key); the pairs keep them apart.
- postrouting: a sandbox with egress is masqueraded behind the node's address (never toward the
  tunnel: the members see each other's own addresses).
- names (``names=True``, when the agent runs its DNS responder, clawnode.names): DNS (UDP and
  TCP 53) is the one thing of the host a sandbox may start, to the sandboxes' gateway address
  and from its own address on its own veth; and the one thing of the host a job peer with a
  sandbox may reach, on the node's mesh address.
The rules match the WireGuard interface and every sandbox veth by name (the ``msbx`` prefix),
so a peer or a sandbox that comes up is covered before its first packet; only the pair and
egress sets follow the desired state, and the daemon renders them before a peer is added and
keeps them until it is removed. The table is replaced in one `nft -f` transaction, so there is
never a moment without rules.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .sandbox.network import host_veth

if TYPE_CHECKING:
    from .wire import DesiredState

TABLE = "clawnode"
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
SANDBOX_VETH_PREFIX = "msbx"  # clawnode.sandbox.network.HOST_VETH_PREFIX
SANDBOX_GATEWAY = "169.254.0.1"  # clawnode.sandbox.network.GATEWAY: where sandboxes ask names
# Where a sandbox never goes, egress or not: private, shared, link-local, loopback, multicast
# and reserved ranges (RFC 6890), which hold the provider's LAN and the mesh. The host's own
# addresses are covered by the input chain whatever their range.
PRIVATE_NETWORKS = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


class FirewallError(RuntimeError):
    pass


@dataclass(frozen=True, order=True)
class SandboxRule:
    """One sandbox as the firewall sees it: its host veth, its address, the job peer's address
    (the only source besides its members that reaches it), whether it may reach the internet,
    and the members of its order's private network (addresses, wire.SandboxSpec.mesh)."""

    veth: str
    address: str
    peer_address: str
    egress: bool
    mesh: tuple[str, ...] = ()


def _host(address: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Interface(address).ip
    except ValueError:
        raise ValueError(f"{what} {address!r} is not an IPv4 address") from None


def _elements(items: Sequence[str]) -> str:
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def render_ruleset(
    interface: str,
    mesh_address: str,
    sandboxes: Sequence[SandboxRule] = (),
    blocked: Sequence[str] = PRIVATE_NETWORKS,
    *,
    names: bool = False,
) -> str:
    """The whole `inet clawnode` table as an nft script (pure). ``names``: let sandboxes and
    job peers ask the node's DNS responder (port 53 on the sandboxes' gateway address and on
    the mesh address), nothing more of the host."""
    if not _IFNAME.fullmatch(interface):
        raise ValueError(f"bad interface name {interface!r}")
    if interface.startswith(SANDBOX_VETH_PREFIX):
        raise ValueError(f"interface name {interface!r} takes the sandbox veths' prefix")
    mesh = ipaddress.IPv4Address(mesh_address)
    pairs, peers, owned, egress, members, meshed = [], [], [], [], [], []
    for i, box in enumerate(sandboxes):
        if not (_IFNAME.fullmatch(box.veth) and box.veth.startswith(SANDBOX_VETH_PREFIX)):
            raise ValueError(f"sandboxes[{i}].veth {box.veth!r} is not a sandbox veth name")
        address = _host(box.address, f"sandboxes[{i}].address")
        peer = _host(box.peer_address, f"sandboxes[{i}].peer_address")
        pairs.append(f"{peer} . {address}")
        peers.append(str(peer))
        owned.append(f'"{box.veth}" . {address}')
        if box.egress:
            egress.append(str(address))
        for j, mate in enumerate(box.mesh):
            member = _host(mate, f"sandboxes[{i}].mesh[{j}]")
            members.append(f"{address} . {member}")
            meshed.append(str(member))
    ranges = [str(ipaddress.IPv4Network(net)) for net in blocked]
    wg, sbx = f'"{interface}"', f'"{SANDBOX_VETH_PREFIX}*"'
    dns = "meta l4proto { tcp, udp } th dport 53"
    sandbox_dns = (
        f"\t\tiifname {sbx} iifname . ip saddr @owned ip daddr {SANDBOX_GATEWAY} {dns} accept\n"
        if names
        else ""
    )
    peer_dns = (
        f"\t\tiifname {wg} ip saddr @sandboxed ip daddr {mesh} {dns} accept\n" if names else ""
    )
    return (
        # Declaring then deleting makes the script work whether or not the table exists, and
        # nft applies the whole file as one transaction.
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        # (job peer address . its sandbox address): the only way into a sandbox
        f"\tset pairs {{ type ipv4_addr . ipv4_addr;{_elements(sorted(set(pairs)))} }}\n"
        # job peers that own a sandbox: they reach nothing of the host
        f"\tset sandboxed {{ type ipv4_addr;{_elements(sorted(set(peers)))} }}\n"
        # (host veth . sandbox address): a sandbox speaks from its own address only
        # While the daemon holds the old rules with the new, one sandbox may come twice
        f"\tset owned {{ type ifname . ipv4_addr;{_elements(sorted(set(owned)))} }}\n"
        f"\tset egress {{ type ipv4_addr;{_elements(sorted(set(egress)))} }}\n"
        # (sandbox address . member of its order's network): both ways, nothing more
        f"\tset members {{ type ipv4_addr . ipv4_addr;{_elements(sorted(set(members)))} }}\n"
        # every member address: none reaches the host
        f"\tset meshed {{ type ipv4_addr;{_elements(sorted(set(meshed)))} }}\n"
        f"\tset private {{ type ipv4_addr; flags interval;{_elements(ranges)} }}\n"
        f"\tchain input {{\n"
        f"\t\ttype filter hook input priority filter; policy accept;\n"
        f"\t\tiifname {sbx} ct state established,related accept\n"
        f"{sandbox_dns}"
        f"\t\tiifname {sbx} counter drop\n"
        f"\t\tiifname {wg} meta nfproto ipv6 counter drop\n"
        f"\t\tiifname {wg} ip saddr @meshed counter drop\n"
        f"{peer_dns}"
        # The answers to the agent's own pings (clawnode.rtt): an echo reply that conntrack
        # ties to a request the host sent, to the mesh address. Nothing a peer starts matches.
        f"\t\tiifname {wg} ip saddr @sandboxed ip daddr {mesh} icmp type echo-reply "
        f"ct state established accept\n"
        f"\t\tiifname {wg} ip saddr @sandboxed counter drop\n"
        f"\t\tiifname {wg} ip daddr != {mesh} counter drop\n"
        f"\t}}\n"
        f"\tchain forward {{\n"
        f"\t\ttype filter hook forward priority filter; policy accept;\n"
        f"\t\tiifname {sbx} meta nfproto ipv6 counter drop\n"
        f"\t\toifname {sbx} meta nfproto ipv6 counter drop\n"
        f"\t\tiifname {sbx} iifname . ip saddr != @owned counter drop\n"
        f"\t\tiifname {wg} oifname {sbx} ip saddr . ip daddr @pairs accept\n"
        f"\t\tiifname {sbx} oifname {wg} ct state established ip daddr . ip saddr @pairs accept\n"
        f"\t\tiifname {wg} oifname {sbx} ip daddr . ip saddr @members accept\n"
        f"\t\tiifname {sbx} oifname {wg} ip saddr . ip daddr @members accept\n"
        f"\t\tiifname {sbx} oifname {sbx} ip saddr . ip daddr @members accept\n"
        f"\t\tiifname {wg} counter drop\n"
        f"\t\toifname {wg} counter drop\n"
        f"\t\toifname {sbx} ip daddr @egress ct state established,related accept\n"
        f"\t\toifname {sbx} counter drop\n"
        f"\t\tiifname {sbx} ip daddr @private counter drop\n"
        f"\t\tiifname {sbx} ip saddr != @egress counter drop\n"
        f"\t}}\n"
        f"\tchain postrouting {{\n"
        f"\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        f"\t\toifname != {sbx} oifname != {wg} ip saddr @egress masquerade\n"
        f"\t}}\n"
        f"}}\n"
    )


class Firewall(Protocol):
    def apply(
        self, interface: str, mesh_address: str, sandboxes: Sequence[SandboxRule] = ()
    ) -> None: ...

    def remove(self) -> None: ...


class NftFirewall:
    """The real firewall: `nft -f -` with the rendered table."""

    def __init__(self, nft: str = "nft", *, names: bool = False) -> None:
        self.nft = nft
        self.names = names  # the DNS responder runs: let its clients reach it

    def _run(self, script: str) -> None:
        result = subprocess.run(
            [self.nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise FirewallError(f"nft refused the ruleset: {result.stderr.strip()}")

    def apply(
        self, interface: str, mesh_address: str, sandboxes: Sequence[SandboxRule] = ()
    ) -> None:
        self._run(render_ruleset(interface, mesh_address, sandboxes, names=self.names))

    def remove(self) -> None:
        self._run(f"table inet {TABLE}\ndelete table inet {TABLE}\n")


@dataclass
class FakeFirewall:
    """Test double with the same interface: remembers what it was asked to enforce."""

    applied: list[tuple[str, str]] = field(default_factory=list)
    # The sandbox rules of each apply, in step with `applied`
    sandboxes: list[tuple[SandboxRule, ...]] = field(default_factory=list)
    removed: bool = False

    def apply(
        self, interface: str, mesh_address: str, sandboxes: Sequence[SandboxRule] = ()
    ) -> None:
        self.applied.append((interface, mesh_address))
        self.sandboxes.append(tuple(sandboxes))

    def remove(self) -> None:
        self.removed = True


def sandbox_rules(desired: DesiredState) -> tuple[SandboxRule, ...]:
    """The firewall's view of a desired state's sandboxes, in a stable order."""
    return tuple(
        sorted(
            SandboxRule(
                veth=host_veth(box.ref),
                address=box.address,
                peer_address=box.peer_address,
                egress=box.egress,
                mesh=box.mesh,
            )
            for box in desired.sandboxes
        )
    )
