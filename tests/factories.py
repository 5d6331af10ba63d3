"""Builders for real objects through real services (no hand-written rows for money or mesh).

Nodes enrol through marketplace.demo_data's enrolment, the one seed_demo uses: the envelope the
agent's own `clawnode join` builds, signed by a fresh identity."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time

from clawnode import wire
from clawnode.gateway_http import build_enroll_envelope
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair

from marketplace.demo_data import enrol_node
from marketplace.listings import create_listing
from marketplace.models import Listing, SshKey
from marketplace.money import MICRO_PER_USD
from meshnet.models import Node

# micro-USD: every amount in the ledger and the API is an integer of them
USD = MICRO_PER_USD


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
    """A signed enrolment envelope, exactly as `clawnode join` sends it from this machine
    (`nonce` fixes the nonce, to test replays; `wireguard_public_key` replaces the identity's
    own X25519 conversion, to test that the gateway refuses it; both re-signed by the identity)."""
    envelope = build_enroll_envelope(
        identity,
        token,
        hostname=socket.gethostname(),
        listen_port=listen_port,
        endpoint=endpoint,
        gpus=gpus,
        now=timestamp,
    )
    overrides = {
        field: value
        for field, value in (("nonce", nonce), ("wireguard_public_key", wireguard_public_key))
        if value is not None
    }
    if not overrides:
        return envelope
    return wire.signed_envelope(wire.ENROLL, {**envelope["body"], **overrides}, identity)


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
    gpus = gpus if gpus is not None else [gpu(0), gpu(1)]
    node, _identity = enrol_node(
        owner, hostname=socket.gethostname(), gpus=gpus, observed_ip="203.0.113.10", region=region
    )
    return node


def wg_public_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


def ssh_public_key(comment: str = "") -> str:
    """A fresh ed25519 public key line as a .pub file holds it (without calling ssh-keygen)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    line = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        .decode()
    )
    return f"{line} {comment}".rstrip()


def sandbox_for(order, *, state: str = "ready", host_keys=(), ports=(8888,), progress: int = 0):
    """The Sandbox row provisioning would make for `order`, as its node last reported it (the
    pages and the API only read it). Its GPUs are the order's first GPUs of the node."""
    from meshnet.ipplan import sandbox_subnet
    from meshnet.models import Node, Sandbox

    node = Node.objects.get(pk=order.listing.node_id)
    subnet = sandbox_subnet(node.mesh_address)
    gpus = [
        {"index": g.index, "name": g.name, "uuid": f"GPU-{node.pk:04d}-{g.index:04d}"}
        for g in node.gpus.order_by("index")[: order.gpu_count]
    ]
    return Sandbox.objects.create(
        node=node,
        ref=f"order:{order.pk}",
        address=str(subnet.network_address + 2 + order.pk % 29),
        peer_address=order.job_peer.address if order.job_peer_id else "10.100.200.9",
        image=order.image or "molt/pytorch:2.4",
        cpus_milli=4000 * order.gpu_count,
        memory_mb=16384 * order.gpu_count,
        disk_gb=50,
        state=state,
        progress=progress,
        gpus=gpus if state in ("starting", "ready") else [],
        host_keys=list(host_keys),
        ports=list(ports),
        added_revision=node.desired_revision or 1,
    )


def report_sandbox(order_id: int, **fields):
    """The order's sandbox as if its node had just reported `fields` (state, progress,
    host_keys, ...): the row provisioning made is updated, or one is made where provisioning
    made none, and sandbox_changed is sent in the same transaction, as status ingestion does."""
    from django.db import transaction

    from marketplace.models import Order
    from meshnet.models import Sandbox
    from meshnet.signals import sandbox_changed

    with transaction.atomic():
        sandbox = Sandbox.objects.select_for_update().filter(ref=f"order:{order_id}").first()
        if sandbox is None:
            sandbox = sandbox_for(Order.objects.get(pk=order_id), state="pending")
        if "gpus" not in fields and fields.get("state") in ("starting", "ready"):
            fields["gpus"] = [
                {
                    "index": g.index,
                    "name": g.name,
                    "uuid": f"GPU-{sandbox.node_id:04d}-{g.index:04d}",
                }
                for g in sandbox.node.gpus.order_by("index")[
                    : Order.objects.get(pk=order_id).gpu_count
                ]
            ]
        for name, value in fields.items():
            setattr(sandbox, name, value)
        sandbox.save()
        sandbox_changed.send(sender=Sandbox, sandbox=sandbox)
    return sandbox


# --- sandboxes --------------------------------------------------------------------------------

SANDBOX_IMAGE = "docker.io/molt/sandbox-base:1"


def ssh_public_key_line(comment: str = "buyer@laptop") -> str:
    """A well-formed OpenSSH ed25519 public key line for a fresh random key (the wire format:
    length-prefixed "ssh-ed25519" then 32 key bytes, base64)."""
    blob = b"".join(
        len(part).to_bytes(4, "big") + part for part in (b"ssh-ed25519", os.urandom(32))
    )
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


def ssh_key(user, *, name: str = "laptop", public_key: str | None = None):
    """An SSH key on `user`'s account, its fingerprint as `ssh-keygen -l` prints it."""
    line = public_key or ssh_public_key_line()
    blob = base64.b64decode(line.split()[1])
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return SshKey.objects.create(user=user, name=name, public_key=line, fingerprint=fingerprint)


def sandbox_listing(
    owner,
    node,
    *,
    gpu_count: int,
    images=(SANDBOX_IMAGE,),
    price_per_gpu_hour: int = 2 * USD,
    price_per_gib: int = 10_000,
    cpus_per_gpu: int = 4,
    memory_gb_per_gpu: int = 16,
    disk_gb: int = 50,
    egress: bool = True,
):
    """A listing of `node` whose orders run in sandboxes: `images` reported by the node (as its
    inventory would) and offered by the listing, with its per-GPU limits."""
    Node.objects.filter(pk=node.pk).update(images=list(images))
    listing = create_listing(
        owner,
        node=node,
        gpu_count=gpu_count,
        price_per_gpu_hour=price_per_gpu_hour,
        price_per_gib=price_per_gib,
    )
    terms = {
        "images": list(images),
        "cpus_per_gpu": cpus_per_gpu,
        "memory_gb_per_gpu": memory_gb_per_gpu,
        "disk_gb": disk_gb,
        "egress": egress,
    }
    Listing.objects.filter(pk=listing.pk).update(**terms)
    listing.refresh_from_db()
    return listing


def sandbox_status_envelope(identity: Identity, node_id: str, *reports, full: bool = False):
    """A SANDBOX_STATUS envelope as the agent sends it, signed by `identity`; each report a
    wire.SandboxReport or a dict of its fields."""
    parsed = tuple(
        report if isinstance(report, wire.SandboxReport) else wire.SandboxReport.from_dict(report)
        for report in reports
    )
    body = wire.SandboxStatus(
        node_id=node_id, sandboxes=parsed, timestamp=int(time.time()), full=full
    )
    return wire.signed_envelope(wire.SANDBOX_STATUS, body.to_dict(), identity)


def staff_login(client, user):
    """Log `client` in as staff `user` the way the admin's form does: password and TOTP code
    (frontend/staff_otp.py). The session is marked verified with a confirmed device of the user
    (one is created if they have none), as django_otp.login does after a correct code."""
    from django_otp import DEVICE_ID_SESSION_KEY
    from django_otp.plugins.otp_totp.models import TOTPDevice

    device = TOTPDevice.objects.filter(user=user, confirmed=True).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name="test", confirmed=True)
    client.force_login(user)
    session = client.session
    session[DEVICE_ID_SESSION_KEY] = device.persistent_id
    session.save()
    return client


def totp_code(device, *, step_offset: int = 0) -> str:
    """The code `device` accepts now (django_otp's own TOTP), optionally a step later."""
    from django_otp.oath import TOTP

    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + step_offset * device.step
    return f"{totp.token():0{device.digits}d}"
