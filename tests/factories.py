"""Builders for real objects through real services (no hand-written rows for money or mesh)."""

from __future__ import annotations

import socket
import time

from clawnode import protocol
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair

from meshnet import services as mesh


def enroll_request(
    identity: Identity,
    token: str,
    *,
    gpus=(),
    timestamp: int | None = None,
    nonce: str | None = None,
    listen_port: int = 51820,
    endpoint: str = "",
    wireguard_public_key: str | None = None,
) -> dict:
    """A signed enrolment envelope, exactly as `clawnode join` sends it (`wireguard_public_key`
    replaces the identity's own X25519 conversion, to test that the gateway refuses it)."""
    body = protocol.EnrollRequest(
        token=token,
        identity_public_key=identity.public_key_b64,
        wireguard_public_key=wireguard_public_key or identity.wireguard_public_key_b64,
        hostname=socket.gethostname(),
        listen_port=listen_port,
        endpoint=endpoint,
        gpus=tuple(gpus),
        timestamp=int(time.time()) if timestamp is None else timestamp,
        nonce=nonce or protocol.new_nonce(),
    ).to_dict()
    return protocol.signed_envelope(protocol.ENROLL, body, identity)


def gpu(index: int, name: str = "RTX 4090", memory_mb: int = 24564, simulated: bool = False):
    return protocol.GpuInfo(
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
    issued = mesh.create_enrollment_token(owner)
    gpus = gpus if gpus is not None else [gpu(0), gpu(1)]
    node = mesh.enroll_node(
        enroll_request(identity, issued.token, gpus=gpus), observed_ip="203.0.113.10"
    ).node
    if region:
        node.region = region
        node.save(update_fields=["region"])
    return node


def wg_public_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])
