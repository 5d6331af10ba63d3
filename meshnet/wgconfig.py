"""wg-quick configuration rendering: pure, no database.

The buyer's config is complete but for the PrivateKey, which only the buyer holds (the browser
or `wg genkey` made it); the line is left as a comment for the buyer's tool to fill in.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, field

PRIVATE_KEY_PLACEHOLDER = (
    "# PrivateKey = <the private key of this order's key pair; only you hold it>"
)


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str = ""
    persistent_keepalive: int = 0

    def __post_init__(self) -> None:
        for net in self.allowed_ips:
            ipaddress.ip_network(net, strict=True)
        if not 0 <= self.persistent_keepalive <= 65535:
            raise ValueError("persistent_keepalive must be 0..65535")


@dataclass(frozen=True)
class WgInterface:
    addresses: tuple[str, ...]
    private_key: str | None = None
    listen_port: int | None = None
    dns: tuple[str, ...] = ()
    # The DNS line written as a comment, to uncomment: wg-quick up fails outright on a machine
    # without resolvconf (or systemd-resolved's), so the default file must not need one.
    dns_commented: bool = False
    mtu: int | None = None
    peers: tuple[WgPeer, ...] = field(default_factory=tuple)


def _line(key: str, value: object) -> str:
    text = str(value)
    if any(ch in text for ch in "\r\n#"):
        raise ValueError(f"{key} value must be a single line without '#': {text!r}")
    return f"{key} = {text}"


def render(config: WgInterface, *, comment: str = "") -> str:
    """Render a wg-quick file. `comment` lines go at the top, prefixed with '#'."""
    lines: list[str] = [f"# {c}" if c else "#" for c in comment.splitlines()]
    lines.append("[Interface]")
    if config.private_key:
        lines.append(_line("PrivateKey", config.private_key))
    else:
        lines.append(PRIVATE_KEY_PLACEHOLDER)
    for address in config.addresses:
        ipaddress.ip_interface(address)
    lines.append(_line("Address", ", ".join(config.addresses)))
    if config.listen_port is not None:
        lines.append(_line("ListenPort", config.listen_port))
    if config.dns:
        line = _line("DNS", ", ".join(config.dns))
        lines.append(f"# {line}" if config.dns_commented else line)
    if config.mtu is not None:
        lines.append(_line("MTU", config.mtu))
    for peer in config.peers:
        lines.append("")
        lines.append("[Peer]")
        lines.append(_line("PublicKey", peer.public_key))
        lines.append(_line("AllowedIPs", ", ".join(peer.allowed_ips)))
        if peer.endpoint:
            lines.append(_line("Endpoint", peer.endpoint))
        if peer.persistent_keepalive:
            lines.append(_line("PersistentKeepalive", peer.persistent_keepalive))
    return "\n".join(lines) + "\n"


def buyer_config(
    *,
    job_address: str,
    provider_public_key: str,
    provider_address: str,
    endpoint: str,
    order_label: str,
    private_key: str | None = None,
    sandbox_address: str | None = None,
    hub: WgPeer | None = None,
    dns: tuple[str, ...] = (),
    sandbox_name: str | None = None,
    dns_active: bool = False,
) -> str:
    """The buyer's side of one job: its /32 job address, one peer (the provider node) whose only
    allowed IP is the job's sandbox address when the job has a sandbox (the node lets the
    buyer reach nothing else), else the node's mesh address; keepalive so NAT mappings stay
    open. With `hub` (the gateway's hub, meshnet.hub.buyer_hub_peer), a second peer: the hub
    sees the buyer's public mapping from its keepalives and the node sends toward it
    (coordinated punching, docs/nat.md); it carries no traffic (the hub routes nothing).
    With `dns` (meshnet.names.buyer_dns: the node's names responder on its mesh address, and
    the search domain), a DNS line, and that address routed into the tunnel too (the node
    lets the buyer reach nothing of it but port 53): as a comment to uncomment unless
    `dns_active` (the buyer asked for it: wg-quick up needs resolvconf for an active one)."""
    allowed = [f"{sandbox_address or provider_address}/32"]
    for value in dns:
        with contextlib.suppress(ValueError):
            if f"{ipaddress.IPv4Address(value)}/32" not in allowed:
                allowed.append(f"{value}/32")
    comment = f"MOLT {order_label}\nProvider node {provider_address}"
    if sandbox_address:
        comment += f"\nSandbox {sandbox_address}"
        if sandbox_name and dns:
            short = sandbox_name.removesuffix(".molt")
            comment += f"\nName {sandbox_name}: ssh root@{short} with the DNS line"
            if not dns_active:
                comment += " uncommented (wg-quick needs resolvconf for it)"
    return render(
        WgInterface(
            addresses=(f"{job_address}/32",),
            private_key=private_key,
            dns=dns,
            dns_commented=not dns_active,
            peers=(
                WgPeer(
                    public_key=provider_public_key,
                    allowed_ips=tuple(allowed),
                    endpoint=endpoint,
                    persistent_keepalive=25,
                ),
                *((hub,) if hub is not None else ()),
            ),
        ),
        comment=comment,
    )


@dataclass(frozen=True)
class NodePeer:
    """One node of a multi-node job as the buyer's file names it: the node's key, where to send
    (the node's endpoint, or its relay's when the part's path is relayed) and the job's
    sandbox addresses on that node (its mesh address for a part without a sandbox)."""

    public_key: str
    endpoint: str
    addresses: tuple[str, ...]
    label: str = ""


def group_buyer_config(
    *,
    job_address: str,
    nodes: tuple[NodePeer, ...],
    order_label: str,
    private_key: str | None = None,
    hub: WgPeer | None = None,
    dns: tuple[str, ...] = (),
    dns_active: bool = False,
) -> str:
    """The buyer's side of a multi-node job: ONE interface (its one /32 tunnel address, the
    same on every node of the job) and one peer per node, whose allowed IPs are that node's
    sandbox /32s of the job (each node lets the buyer's address reach nothing else); the
    hub's peer once, as in buyer_config. The buyer's key is one peer of every node, so the
    file has no peer twice; a node named twice is a caller's bug (ValueError). With `dns`
    (one node's names responder, which answers every part's name, and the search domain; the
    caller puts the responder's address in that node's `addresses`) a DNS line, commented
    unless `dns_active`, as in buyer_config."""
    keys = [node.public_key for node in nodes]
    if len(set(keys)) != len(keys):
        raise ValueError("a node is named twice")
    lines = [f"MOLT {order_label}"]
    lines += [f"{node.label or node.public_key[:8]}: {', '.join(node.addresses)}" for node in nodes]
    return render(
        WgInterface(
            addresses=(f"{job_address}/32",),
            private_key=private_key,
            dns=dns,
            dns_commented=not dns_active,
            peers=(
                *(
                    WgPeer(
                        public_key=node.public_key,
                        allowed_ips=tuple(f"{address}/32" for address in node.addresses),
                        endpoint=node.endpoint,
                        persistent_keepalive=25,
                    )
                    for node in nodes
                ),
                *((hub,) if hub is not None else ()),
            ),
        ),
        comment="\n".join(lines),
    )
