"""Builders for real objects through real services (no hand-written rows for money or mesh)."""

from __future__ import annotations

import socket
import time

from clawnode import wire
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair

from meshnet.enrolment import create_enrollment_token, enroll_node


def enroll_request(
    identity: Identity,
    token: str,
    *,
    gpus=(),
    timestamp: int | None = None,
    nonce: str | None = None,
    listen_port: int = 51820,
    endpoint: str = "",
) -> dict:
    """A signed enrolment envelope, exactly as `clawnode join` sends it."""
    body = wire.EnrollRequest(
        token=token,
        identity_public_key=identity.public_key_b64,
        wireguard_public_key=identity.wireguard_public_key_b64,
        hostname=socket.gethostname(),
        listen_port=listen_port,
        endpoint=endpoint,
        gpus=tuple(gpus),
        timestamp=int(time.time()) if timestamp is None else timestamp,
        nonce=nonce or wire.new_nonce(),
    ).to_dict()
    return wire.signed_envelope(wire.ENROLL, body, identity)


def gpu(index: int, name: str = "RTX 4090", memory_mb: int = 24564, simulated: bool = False):
    return wire.GpuInfo(
        index=index,
        name=name,
        memory_mb=memory_mb,
        uuid=f"GPU-{index:04d}",
        driver_version="550.54",
        cuda_version="12.4",
        simulated=simulated,
    )


def enrolled_node(owner, gpus=None, *, region: str = "eu-west"):
    """A node of `owner` enrolled through the real signed enrolment path."""
    identity = Identity.generate()
    issued = create_enrollment_token(owner)
    gpus = gpus if gpus is not None else [gpu(0), gpu(1)]
    node = enroll_node(
        enroll_request(identity, issued.token, gpus=gpus), observed_ip="203.0.113.10"
    ).node
    if region:
        node.region = region
        node.save(update_fields=["region"])
    return node


def wg_public_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])
