"""The demo market, and the one way demo and test data enrol a node.

`manage.py seed_demo` loads the market described here; tests/scaled_market.py copies it N times
for the page measurements; tests/factories.py enrols its nodes through `enrol_node` too. A node
enrols through the real signed enrolment path: a fresh Ed25519 identity signs the envelope that
the agent's own `clawnode join` builds (clawnode.gateway_http), carrying a one-time token, so
the rows are the ones a real agent would have made.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from clawnode import wire
from clawnode.gateway_http import build_enroll_envelope
from clawnode.keys import Identity
from clawnode.state import Enrollment, StateDir, normalize_gateway_url

from marketplace.demo_network import (
    DEMO_LISTEN_PORT,
    REAL_NODES_HOST,
    REAL_NODES_NET,
    REAL_NODES_PREFIX,
)
from meshnet import ipplan
from meshnet.enrolment import create_enrollment_token, enroll_node, websocket_url
from meshnet.gateway_key import gateway_identity
from meshnet.models import Node

H100 = ("NVIDIA H100 80GB HBM3", 81559)
A100 = ("NVIDIA A100 80GB PCIe", 81920)
L40S = ("NVIDIA L40S", 49152)
RTX_4090 = ("NVIDIA GeForce RTX 4090", 24564)
RTX_3090 = ("NVIDIA GeForce RTX 3090", 24576)


@dataclass(frozen=True)
class DemoListing:
    gpu_count: int
    price_per_gpu_hour: int  # micro-USD
    price_per_gib: int  # micro-USD


@dataclass(frozen=True)
class DemoNode:
    hostname: str
    region: str
    gpu: tuple[str, int]  # (NVML name, memory in MiB)
    gpu_count: int
    observed_ip: str  # documentation ranges only: nothing here is a real machine
    endpoint: str
    listings: tuple[DemoListing, ...]

    def listing_terms(self, listing: DemoListing) -> dict:
        """`listing` of this node as create_listing's keywords (and the fields to find it by)."""
        return {
            "gpu_model": self.gpu[0],
            "gpu_count": listing.gpu_count,
            "price_per_gpu_hour": listing.price_per_gpu_hour,
            "price_per_gib": listing.price_per_gib,
        }


@dataclass(frozen=True)
class DemoUser:
    username: str
    password: str
    role: str


OPERATOR = DemoUser("operator", "operator-demo-pass", "superuser: /admin/")
# The operator's TOTP key (hex, as django-otp stores it): published like the passwords, so the
# demo admin can be used with any authenticator app. RFC 4226's test key, base32
# GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ.
OPERATOR_TOTP_KEY = "3132333435363738393031323334353637383930"
BUYER = DemoUser("demo-buyer", "buyer-demo-pass", "buyer with 500 USD of credits")
PROVIDERS: tuple[tuple[DemoUser, tuple[DemoNode, ...]], ...] = (
    (
        DemoUser("dc-provider", "dc-provider-demo-pass", "provider: data-centre nodes"),
        (
            DemoNode(
                "dc-sjc-01",
                "us-west",
                H100,
                8,
                "198.51.100.21",
                "198.51.100.21:51820",
                (DemoListing(8, 2_490_000, 10_000),),
            ),
            DemoNode(
                "dc-iad-01",
                "us-east",
                A100,
                4,
                "198.51.100.22",
                "198.51.100.22:51820",
                (DemoListing(4, 1_590_000, 8_000),),
            ),
            DemoNode(
                "dc-iad-02",
                "us-east",
                L40S,
                4,
                "198.51.100.23",
                "198.51.100.23:51820",
                (DemoListing(2, 890_000, 8_000), DemoListing(2, 990_000, 6_000)),
            ),
            DemoNode(
                "dc-ams-01",
                "eu-west",
                A100,
                8,
                "198.51.100.24",
                "198.51.100.24:51820",
                (DemoListing(4, 1_490_000, 9_000),),
            ),
            DemoNode(
                "dc-sin-01",
                "asia",
                H100,
                4,
                "198.51.100.25",
                "198.51.100.25:51820",
                (DemoListing(4, 2_790_000, 12_000),),
            ),
        ),
    ),
    (
        DemoUser("home-provider", "home-provider-demo-pass", "provider: home machines behind NAT"),
        (
            DemoNode(
                "home-berlin",
                "eu-west",
                RTX_4090,
                2,
                "203.0.113.41",
                "",
                (DemoListing(2, 350_000, 5_000),),
            ),
            DemoNode(
                "home-lyon",
                "eu-west",
                RTX_3090,
                2,
                "203.0.113.42",
                "",
                (DemoListing(2, 190_000, 4_000),),
            ),
            DemoNode(
                "home-austin",
                "us-west",
                RTX_3090,
                1,
                "203.0.113.43",
                "",
                (DemoListing(1, 220_000, 4_000),),
            ),
            DemoNode(
                "home-osaka",
                "asia",
                RTX_4090,
                1,
                "203.0.113.44",
                "",
                (DemoListing(1, 390_000, 6_000),),
            ),
        ),
    ),
)


@dataclass(frozen=True)
class RealNode:
    """A demo node as `make run` places it for its real daemon (marketplace.demo_network)."""

    hostname: str
    address: str  # on the bridge, inside the node's namespace
    interface: str  # its WireGuard interface

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{DEMO_LISTEN_PORT}"


def real_nodes() -> tuple[RealNode, ...]:
    nodes = [node for _, demo_nodes in PROVIDERS for node in demo_nodes]
    return tuple(
        RealNode(node.hostname, f"{REAL_NODES_NET}.{11 + index}", f"mdemo{index + 1}")
        for index, node in enumerate(nodes)
    )


def simulated_gpus(node: DemoNode) -> tuple[wire.GpuInfo, ...]:
    name, memory_mb = node.gpu
    return tuple(
        wire.GpuInfo(
            index=index,
            name=name,
            memory_mb=memory_mb,
            # Stable per host and slot, shaped like NVML's "GPU-<uuid>".
            uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{node.hostname}.demo.molt/{index}')}",
            driver_version="550.54.15",
            cuda_version="12.4",
            simulated=True,
        )
        for index in range(node.gpu_count)
    )


def enrol_node(
    owner,
    *,
    hostname: str,
    gpus: Sequence[wire.GpuInfo],
    observed_ip: str | None,
    endpoint: str = "",
    region: str = "",
) -> tuple[Node, Identity]:
    """Enrol a node for `owner` the way `clawnode join` does: a new identity signs an enrolment
    request carrying a one-time token. Returns the node and its identity (the agent's signing
    key: metering samples and acknowledgements a test sends as the agent are signed with it)."""
    identity = Identity.generate()
    issued = create_enrollment_token(owner)
    envelope = build_enroll_envelope(
        identity,
        issued.token,
        hostname=hostname,
        listen_port=DEMO_LISTEN_PORT,
        endpoint=endpoint,
        gpus=gpus,
        region=region,
    )
    node = enroll_node(envelope, observed_ip=observed_ip).node
    return node, identity


def enrol_demo_node(owner, node: DemoNode) -> tuple[Node, Identity]:
    """`node` of the demo market, enrolled for `owner` with its simulated GPUs."""
    return enrol_node(
        owner,
        hostname=node.hostname,
        gpus=simulated_gpus(node),
        observed_ip=node.observed_ip,
        endpoint=node.endpoint,
        region=node.region,
    )


# Next to enrollment.json in a demo agent's state dir: the GPUs it enrolled with, which
# scripts/demo_agents.py reports back unchanged (the same UUIDs, so the inventory stays put).
DEMO_GPUS_FILE = "demo-gpus.json"


# Next to it, for a real demo node only: where scripts/demo_nodes.py puts its namespace.
REAL_NODE_FILE = "real-node.json"


def save_demo_agent(
    state: StateDir, node: Node, identity: Identity, gateway: str, real: RealNode | None = None
) -> None:
    """Write what `clawnode join` would have left in `state` for `node`: its identity (0600)
    and an enrolment for the gateway at `gateway`, plus its simulated GPUs, and for a `real`
    node (a daemon in a namespace) its address and interface in real-node.json. The enrolment
    is rewritten each time (the port, the gateway's address and the interface may differ
    between runs); the identity only when it changed."""
    gateway = normalize_gateway_url(gateway)
    kept = state.load_identity() if state.identity_path.exists() else None
    if kept is None or kept.node_id != identity.node_id:
        identity.save(state.identity_path)
    state.save_enrollment(
        Enrollment(
            gateway=gateway,
            node_id=node.node_id,
            name=node.name,
            mesh_address=node.mesh_address,
            gateway_public_key=gateway_identity().public_key_b64,
            websocket_url=websocket_url(gateway),
            interface=real.interface if real is not None else "molt0",
            # What scripts/demo_nodes.py runs (wireguard-go); demo_agents.py, the simulated
            # agents, runs the in-memory backend whatever this says.
            backend="userspace",
            mesh_network=str(ipplan.mesh_network()),
            job_network=ipplan.block(ipplan.JOB_BLOCK).cidr,
            enrolled_at=int(time.time()),
            # A real node dials plain http at the demo bridge's address: this machine's own
            # bridge, as `clawnode join --insecure` accepts on a network one trusts.
            insecure=real is not None,
        )
    )
    gpus = [
        {
            "index": gpu.index,
            "name": gpu.name,
            "memory_mb": gpu.memory_mb,
            "uuid": gpu.uuid,
            "simulated": gpu.simulated,
        }
        for gpu in node.gpus.order_by("index")
    ]
    _write_json(state.path / DEMO_GPUS_FILE, gpus)
    if real is None:
        (state.path / REAL_NODE_FILE).unlink(missing_ok=True)
    else:
        _write_json(
            state.path / REAL_NODE_FILE,
            {
                "address": real.address,
                "prefix": REAL_NODES_PREFIX,
                "gateway_host": REAL_NODES_HOST,
                "interface": real.interface,
            },
        )


def _write_json(path, value) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)
