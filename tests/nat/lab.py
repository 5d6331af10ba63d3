"""The NAT lab: sites behind NATs of every RFC 4787 kind, an "internet" between them.

Everything lives in network namespaces made here; the root namespace gets nothing (no link, no
address, no route), so no packet of the lab can leave the machine. Links are created inside
namespaces (`ip -n A link add ... peer ... netns B`), so their names only need to be unique in
their namespace; namespace names and WireGuard interface names carry a per-run suffix (the
UAPI sockets in /var/run/wireguard are shared by every namespace).

Topology:

    provider sites  <-->  internet: a router namespace, one bridge per network  <-->  buyer sites
    203.0.113.0/24        br-p 203.0.113.1   br-s 192.0.2.1   br-b 198.51.100.1    198.51.100.0/24
                                                   |
                                   services: 192.0.2.10, 192.0.2.20 (observers, the hub)

A site is a host namespace, either public itself (NAT kind "public") or behind a router
namespace whose nftables ruleset is rendered by its `Nat` (a declarative object: mapping and
filtering behaviour by RFC 4787's names, and whether it hairpins). Every home LAN is
192.168.1.0/24 (they are separate namespaces, as separate homes are); a carrier-grade NAT's
inside is 100.64.0.0/24 (RFC 6598 shared address space).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

# Mappings and the filter state live as long as a home router's UDP timeout typically does; the
# lab's tests finish well within it.
STATE_TIMEOUT = "180s"

PROVIDER_NET = "203.0.113"
BUYER_NET = "198.51.100"
SERVICES_NET = "192.0.2"
OBSERVER_A = f"{SERVICES_NET}.10"
OBSERVER_B = f"{SERVICES_NET}.20"
LAN_NET = "192.168.1"
CARRIER_NET = "100.64.0"


class Mapping(enum.Enum):
    """RFC 4787 section 4.1: does the public mapping depend on the destination?"""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"


class Filtering(enum.IntEnum):
    """RFC 4787 section 5: which inbound packets to a mapping pass. Ordered by strictness."""

    ENDPOINT_INDEPENDENT = 0
    ADDRESS_DEPENDENT = 1
    ADDRESS_AND_PORT_DEPENDENT = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


def run(*args: str, check: bool = True, timeout: float = 30, stdin: str | None = None):
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, input=stdin
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


@dataclass(frozen=True)
class Nat:
    """One NAT device's behaviour, rendered as an nftables ruleset for its router namespace.

    The mapping is Linux's own: `masquerade` keeps the source port when it is free, so the same
    inside endpoint gets the same public endpoint whatever the destination (endpoint-independent
    mapping); `masquerade fully-random` (iptables' --random-fully) picks a new random port per
    flow (endpoint-dependent).
    Conntrack alone lets in only replies from the exact remote endpoint (address-and-port-
    dependent filtering); the looser filterings remember, per inside host, which public ports
    it has used (and for address-dependent filtering, to which remote addresses) in dynamic
    sets, and send matching unsolicited packets to that host with a `dnat`.
    """

    name: str
    mapping: Mapping
    filtering: Filtering
    hairpin: bool = False

    def ruleset(
        self, *, wan: str, lan: str, lan_net: str, public_ip: str, hosts: Sequence[str]
    ) -> str:
        """The router's whole ruleset (one table, `nft -f` replaces it atomically)."""
        random = " fully-random" if self.mapping is Mapping.ENDPOINT_DEPENDENT else ""
        sets: list[str] = []
        track: list[str] = []
        inbound: list[str] = []
        hairpin: list[str] = []
        for index, host in enumerate(hosts):
            mapped, contacted = f"mapped_{index}", f"contacted_{index}"
            remembers_ports = self.hairpin or self.filtering is Filtering.ENDPOINT_INDEPENDENT
            if remembers_ports:
                sets.append(
                    f"  set {mapped} {{ type inet_service; flags dynamic,timeout; "
                    f"timeout {STATE_TIMEOUT}; }}"
                )
                track.append(
                    f'    iifname "{lan}" oifname "{wan}" ip saddr {host} '
                    f"update @{mapped} {{ udp sport }}"
                )
            if self.filtering is Filtering.ENDPOINT_INDEPENDENT:
                inbound.append(f'    iifname "{wan}" udp dport @{mapped} dnat to {host}')
            if self.filtering is Filtering.ADDRESS_DEPENDENT:
                sets.append(
                    f"  set {contacted} {{ type ipv4_addr . inet_service; "
                    f"flags dynamic,timeout; timeout {STATE_TIMEOUT}; }}"
                )
                track.append(
                    f'    iifname "{lan}" oifname "{wan}" ip saddr {host} '
                    f"update @{contacted} {{ ip daddr . udp sport }}"
                )
                inbound.append(
                    f'    iifname "{wan}" ip saddr . udp dport @{contacted} dnat to {host}'
                )
            if self.hairpin:
                # RFC 4787 REQ-9: a packet from inside to a mapping of this NAT goes to that
                # mapping's host, from the sender's own public mapping (its source is rewritten
                # below), so the receiver sees what an outside peer would.
                hairpin.append(
                    f'    iifname "{lan}" ip daddr {public_ip} udp dport @{mapped} dnat to {host}'
                )
        lines = [
            "table ip molt_nat {",
            *sets,
            "  chain track {",
            # Mappings are remembered from outbound packets, after routing chose the WAN.
            "    type filter hook forward priority filter; policy accept;",
            *track,
            f'    iifname "{wan}" ct state established,related accept',
            f'    iifname "{wan}" ct status dnat accept',
            f'    iifname "{wan}" drop',
            "  }",
            "  chain inbound {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            *hairpin,
            *inbound,
            "  }",
            "  chain outbound {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            *(
                # The output path has no input interface (ip_output passes none to the hook):
                # hairpinned packets are the ones from the LAN going back to it.
                [f'    oifname "{lan}" ip saddr {lan_net} ct status dnat snat to {public_ip}']
                if self.hairpin
                else []
            ),
            f'    oifname "{wan}" masquerade{random}',
            "  }",
            "  chain router {",
            # The router itself offers nothing on its public side: unsolicited UDP that no rule
            # sent on is dropped silently, as home routers do (no ICMP port unreachable).
            "    type filter hook input priority filter; policy accept;",
            f'    iifname "{wan}" ct state established,related accept',
            f'    iifname "{wan}" meta l4proto udp drop',
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Kind:
    """What a site sits behind: nothing (public), one NAT, or NATs in a row (outermost first)."""

    name: str
    nats: tuple[Nat, ...] = ()

    @property
    def public(self) -> bool:
        return not self.nats

    @property
    def mapping(self) -> Mapping:
        """NATs in a row map independently of the endpoint only if each one does."""
        if any(nat.mapping is Mapping.ENDPOINT_DEPENDENT for nat in self.nats):
            return Mapping.ENDPOINT_DEPENDENT
        return Mapping.ENDPOINT_INDEPENDENT

    @property
    def filtering(self) -> Filtering:
        """NATs in a row filter as their strictest one does."""
        return max((nat.filtering for nat in self.nats), default=Filtering.ENDPOINT_INDEPENDENT)


EIM, EDM = Mapping.ENDPOINT_INDEPENDENT, Mapping.ENDPOINT_DEPENDENT
EIF = Filtering.ENDPOINT_INDEPENDENT
ADF = Filtering.ADDRESS_DEPENDENT
APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT

FULL_CONE = Nat("full-cone", EIM, EIF)
RESTRICTED_CONE = Nat("restricted-cone", EIM, ADF)
PORT_RESTRICTED = Nat("port-restricted", EIM, APDF)
SYMMETRIC = Nat("symmetric", EDM, APDF)
CARRIER_GRADE = Nat("carrier-grade", EIM, APDF)
HAIRPIN = Nat("hairpin", EIM, APDF, hairpin=True)

KINDS: tuple[Kind, ...] = (
    Kind("public"),
    Kind("full-cone", (FULL_CONE,)),
    Kind("restricted-cone", (RESTRICTED_CONE,)),
    Kind("port-restricted", (PORT_RESTRICTED,)),
    Kind("symmetric", (SYMMETRIC,)),
    # A carrier's NAT in front of a home router: both port-preserving masquerades.
    Kind("double", (CARRIER_GRADE, PORT_RESTRICTED)),
)
KINDS_BY_NAME = {kind.name: kind for kind in KINDS}
# Not a kind of the matrix's rows and columns: the provider and the buyer share this one site.
HAIRPIN_SITE = Kind("hairpin", (HAIRPIN,))


def direct_possible(a: Kind, b: Kind) -> bool:
    """Whether RFC 4787 lets two sites that know each other's observed mapping (learned from
    a third party) reach each other directly after both send at the same time.

    A public or endpoint-independent-filtering side accepts anything sent to its mapping. Two
    endpoint-independent mappings: each side sends to the other's real mapping, opening its own
    filter for exactly that endpoint. One endpoint-dependent mapping: its packets to the peer
    come from a port nobody observed, so the peer's filter must not depend on the port.
    """
    for one, other in ((a, b), (b, a)):
        if one.public or (one.mapping is EIM and one.filtering is EIF):
            return True
        if one.mapping is EDM and other.mapping is EDM:
            return False
    if a.mapping is EIM and b.mapping is EIM:
        return True
    eim_side = a if a.mapping is EIM else b
    return eim_side.filtering <= ADF


@dataclass
class Host:
    ns: str
    address: str  # its own address (private behind a NAT)
    public_ip: str  # the address the internet sees


_LABS = itertools.count(1)


@dataclass
class Lab:
    """The internet and the services network; sites are added and removed per test."""

    # Unique per lab, so two labs of one run (a module's and a test's own) never share a name.
    suffix: str = field(default_factory=lambda: f"{os.getpid() % 100000}{next(_LABS)}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    wireguard_interfaces: list[str] = field(default_factory=list)
    _serial: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _public_hosts: dict[str, Iterator[int]] = field(default_factory=dict)

    @property
    def internet(self) -> str:
        return f"ni{self.suffix}"

    @property
    def services(self) -> str:
        return f"ns{self.suffix}"

    def namespace(self, role: str) -> str:
        return self._add_namespace(f"n{role}{next(self._serial)}x{self.suffix}"[:15])

    def exec(self, ns: str, *args: str, check: bool = True, timeout: float = 30):
        return run("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)

    def popen(self, ns: str, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args], start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        run("ip", "-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b,
            "netns", ns_b)  # fmt: skip
        run("ip", "-n", ns_a, "link", "set", name_a, "up")
        run("ip", "-n", ns_b, "link", "set", name_b, "up")

    def _forwarding(self, ns: str) -> None:
        self.exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def _add_namespace(self, name: str) -> str:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def up(self) -> Lab:
        self._add_namespace(self.internet)
        self._forwarding(self.internet)
        for bridge, net in (("br-p", PROVIDER_NET), ("br-b", BUYER_NET), ("br-s", SERVICES_NET)):
            run("ip", "-n", self.internet, "link", "add", bridge, "type", "bridge")
            run("ip", "-n", self.internet, "addr", "add", f"{net}.1/24", "dev", bridge)
            run("ip", "-n", self.internet, "link", "set", bridge, "up")
            self._public_hosts[net] = itertools.count(2)
        self._add_namespace(self.services)
        self._uplink(self.services, SERVICES_NET, addresses=(OBSERVER_A, OBSERVER_B))
        return self

    def _uplink(self, ns: str, net: str, addresses: Sequence[str] = ()) -> str:
        """Connect `ns` to the internet's bridge for `net`; returns its (first) address there."""
        bridge = {PROVIDER_NET: "br-p", BUYER_NET: "br-b", SERVICES_NET: "br-s"}[net]
        port = f"u{next(self._serial)}"
        self._veth(ns, "wan", self.internet, port)
        run("ip", "-n", self.internet, "link", "set", port, "master", bridge)
        if not addresses:
            addresses = (f"{net}.{next(self._public_hosts[net])}",)
        for address in addresses:
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "wan")
        run("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
        return addresses[0]

    def site(self, kind: Kind, net: str, roles: Sequence[str]) -> list[Host]:
        """Hosts named by `roles` behind `kind` (all on one LAN), uplinked to `net`."""
        if kind.public:
            hosts = []
            for role in roles:
                ns = self.namespace(role)
                address = self._uplink(ns, net)
                hosts.append(Host(ns, address, address))
            return hosts
        # Outermost NAT first: it holds the public address; each next one sits on its LAN.
        outside_ns: str | None = None
        outside_lan = ""
        public_ip = ""
        routers: list[tuple[str, Nat, str, str]] = []  # ns, nat, wan address, lan prefix
        for depth, nat in enumerate(kind.nats):
            ns = self.namespace(f"r{depth}")
            self._forwarding(ns)
            if outside_ns is None:
                public_ip = self._uplink(ns, net)
                wan_address = public_ip
            else:
                self._veth(outside_ns, "lan", ns, "wan")
                run("ip", "-n", outside_ns, "addr", "add", f"{outside_lan}.1/24", "dev", "lan")
                wan_address = f"{outside_lan}.2"
                run("ip", "-n", ns, "addr", "add", f"{wan_address}/24", "dev", "wan")
                run("ip", "-n", ns, "route", "add", "default", "via", f"{outside_lan}.1")
            lan_prefix = LAN_NET if depth == len(kind.nats) - 1 else CARRIER_NET
            routers.append((ns, nat, wan_address, lan_prefix))
            outside_ns, outside_lan = ns, lan_prefix
        inner_ns, _, _, _ = routers[-1]
        run("ip", "-n", inner_ns, "link", "add", "lan", "type", "bridge")
        run("ip", "-n", inner_ns, "addr", "add", f"{LAN_NET}.1/24", "dev", "lan")
        run("ip", "-n", inner_ns, "link", "set", "lan", "up")
        hosts = []
        for number, role in enumerate(roles, start=2):
            ns = self.namespace(role)
            self._veth(inner_ns, f"h{number}", ns, "eth0")
            run("ip", "-n", inner_ns, "link", "set", f"h{number}", "master", "lan")
            address = f"{LAN_NET}.{number}"
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", ns, "route", "add", "default", "via", f"{LAN_NET}.1")
            hosts.append(Host(ns, address, public_ip))
        # Each router's ruleset names the addresses on its LAN: the hosts for the innermost,
        # the next router's WAN address for the others.
        for index, (ns, nat, wan_address, _) in enumerate(routers):
            if index == len(routers) - 1:
                inside = [host.address for host in hosts]
            else:
                inside = [routers[index + 1][2]]
            own_public = public_ip if index == 0 else wan_address
            lan_net = f"{routers[index][3]}.0/24"
            rules = nat.ruleset(
                wan="wan", lan="lan", lan_net=lan_net, public_ip=own_public, hosts=inside
            )
            run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules)
        return hosts

    def reboot(self, router: str, new_public: str) -> None:
        """The outermost router `router` comes back as a home router does after a reboot: a new
        public address on its WAN (the ISP's new lease, on the same network) and no connection
        state, so every mapping is gone (its nftables ruleset, which masquerades to whatever
        address the WAN has, stays)."""
        net = new_public.rsplit(".", 1)[0]
        self.exec(router, "ip", "addr", "flush", "dev", "wan")
        self.exec(router, "ip", "addr", "add", f"{new_public}/24", "dev", "wan")
        self.exec(router, "ip", "route", "replace", "default", "via", f"{net}.1")
        self.exec(
            router, sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()"
        )

    def wireguard_name(self, role: str) -> str:
        name = f"nw{role}{next(self._serial)}x{self.suffix}"[:15]
        self.wireguard_interfaces.append(name)
        return name

    def release(self, namespaces: Sequence[str]) -> None:
        """Remove some namespaces (a cell's sites) and every process inside them."""
        for ns in namespaces:
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
            if ns in self.namespaces:
                self.namespaces.remove(ns)

    def release_sites(self) -> None:
        """Remove every site (hosts and routers), keeping the internet and the services."""
        self.release([ns for ns in self.namespaces if ns not in (self.internet, self.services)])

    def down(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self.release(list(reversed(self.namespaces)))
        for name in self.wireguard_interfaces:
            # wireguard-go killed hard leaves its UAPI socket behind in the shared directory.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/var/run/wireguard/{name}.sock")


@contextlib.contextmanager
def nat_lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab.up()
    finally:
        lab.down()
