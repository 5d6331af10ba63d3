"""wg-quick configuration rendering: pure, no database.

The buyer's config is complete but for the PrivateKey, which only the buyer holds (the browser
or `wg genkey` made it); the line is left as a comment for the buyer's tool to fill in.
"""

from __future__ import annotations

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
        lines.append(_line("DNS", ", ".join(config.dns)))
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
) -> str:
    """The buyer's side of one job: its /32 job address, one peer (the provider node) whose only
    allowed IP is the job's sandbox address when the job has a sandbox (the node lets the
    buyer reach nothing else), else the node's mesh address; keepalive so NAT mappings stay
    open."""
    allowed = sandbox_address or provider_address
    comment = f"MOLT {order_label}\nProvider node {provider_address}"
    if sandbox_address:
        comment += f"\nSandbox {sandbox_address}"
    return render(
        WgInterface(
            addresses=(f"{job_address}/32",),
            private_key=private_key,
            peers=(
                WgPeer(
                    public_key=provider_public_key,
                    allowed_ips=(f"{allowed}/32",),
                    endpoint=endpoint,
                    persistent_keepalive=25,
                ),
            ),
        ),
        comment=comment,
    )
