"""How a buyer reaches an order's sandbox, read from meshnet's Sandbox row (the agent's last
report): its state, address, GPUs, the ssh command, and the host keys as fingerprints and
known_hosts lines, so the first connect is verified. Read-only; the API's order and the order
page both show this one shape."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

from marketplace.ssh_keys import fingerprint_of
from meshnet.models import Sandbox


def sandbox_ref(order_id: int) -> str:
    """A sandbox is named like the job's peer."""
    return f"order:{order_id}"


def sandbox_of(order_id: int) -> Sandbox | None:
    return Sandbox.objects.filter(ref=sandbox_ref(order_id)).first()


def sandboxes_of(order_ids: Iterable[int]) -> dict[int, Sandbox]:
    """The sandboxes of several orders in one query, by order id."""
    refs = {sandbox_ref(pk): pk for pk in order_ids}
    return {refs[s.ref]: s for s in Sandbox.objects.filter(ref__in=list(refs))}


def _host_key(line: str) -> tuple[str, str, bytes] | None:
    parts = str(line).split()
    if len(parts) < 2:
        return None
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None  # the wire contract checks the shape; a bad one is left out, not shown
    return parts[0], parts[1], blob


def connect_info(sandbox: Sandbox | None) -> dict[str, Any] | None:
    """The `sandbox` object of an order, or None before provisioning made one."""
    if sandbox is None:
        return None
    keys = [key for key in map(_host_key, sandbox.host_keys or ()) if key is not None]
    return {
        "state": sandbox.state,
        "detail": sandbox.detail,
        "progress": sandbox.progress,
        "address": sandbox.address,
        "image": sandbox.image,
        "gpus": [
            {
                "index": gpu.get("index"),
                "model": gpu.get("model") or gpu.get("name", ""),
                "uuid": gpu.get("uuid", ""),
            }
            for gpu in (sandbox.gpus or ())
            if isinstance(gpu, dict)
        ],
        "ssh_command": f"ssh root@{sandbox.address}",
        "host_key_fingerprints": [fingerprint_of(blob) for _, _, blob in keys],
        # Text to append to ~/.ssh/known_hosts: one line per host key.
        "known_hosts": "\n".join(f"{sandbox.address} {kind} {blob}" for kind, blob, _ in keys),
        "ports": list(sandbox.ports or ()),
    }
