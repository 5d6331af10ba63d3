"""The frames the agent sends on the channel (clawnode.wire.channel), built and, where the
gateway must be able to prove who said it, signed by the node: auth, ack, removed, inventory,
sandbox status.
Metering samples are made by clawnode.metering."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import reconcile, wire
from .gpu import GpuReport
from .keys import Identity

__all__ = ["ack", "auth", "inventory", "metering", "removed", "sandbox_status"]


def auth(identity: Identity, challenge: str) -> dict[str, Any]:
    """The answer to the gateway's per-connection challenge."""
    body = wire.AgentAuth(
        node_id=identity.node_id, challenge=challenge, timestamp=int(time.time())
    ).to_dict()
    return {"type": "auth", "envelope": wire.signed_envelope(wire.AGENT_AUTH, body, identity)}


def ack(
    identity: Identity, revision: int, results: Mapping[str, str], removing: Iterable[str]
) -> dict[str, Any]:
    """The acknowledgement of desired state ``revision``: each changed peer's result (as
    reconcile.apply gives it) and the peers still leaving."""
    body = wire.Ack(
        node_id=identity.node_id,
        revision=revision,
        # The peers this revision changed, failures included: a peer left out is one the
        # interface already had as desired (the gateway counts every peer not reported
        # failed as applied), and a retirement that failed must not be taken for done.
        results=tuple(
            wire.PeerResult(
                public_key=key, ok=results[key] == reconcile.OK, detail=results[key][:500]
            )
            for key in sorted(results)
        ),
        timestamp=int(time.time()),
        removing=tuple(removing),
    ).to_dict()
    return {"type": "ack", "envelope": wire.signed_envelope(wire.ACK, body, identity)}


def removed(identity: Identity, keys: Iterable[str]) -> dict[str, Any]:
    """These peers, once named in an ack's removing, are off the interface now."""
    body = wire.Removed(
        node_id=identity.node_id, public_keys=tuple(sorted(keys)), timestamp=int(time.time())
    ).to_dict()
    return {"type": "removed", "envelope": wire.signed_envelope(wire.REMOVED, body, identity)}


def metering(envelope: dict[str, Any]) -> dict[str, Any]:
    """A signed sample (Meter.sample, Meter.envelope) as a frame."""
    return {"type": "metering", "envelope": envelope}


def sandbox_status(
    identity: Identity, reports: Iterable[wire.SandboxReport], *, full: bool
) -> dict[str, Any]:
    """Where the node's sandboxes stand: all of them (``full``) or those that changed."""
    body = wire.SandboxStatus(
        node_id=identity.node_id,
        sandboxes=tuple(reports),
        timestamp=int(time.time()),
        full=full,
    ).to_dict()
    return {
        "type": "sandbox_status",
        "envelope": wire.signed_envelope(wire.SANDBOX_STATUS, body, identity),
    }


def inventory(report: GpuReport, images: Iterable[str] = (), names: bool = False) -> dict[str, Any]:
    """The GPUs and their health, as read now, the images this node's sandboxes can run
    (the agent's configured list: a listing offers some of them), and whether it runs the
    names responder (clawnode.names: buyers' configs then use it)."""
    return {
        "type": "inventory",
        "images": list(images),
        "names": names,
        "gpus": [gpu.to_dict() for gpu in report.gpus],
        "health": [
            {
                "index": h.index,
                "temperature_c": h.temperature_c,
                "utilization_pct": h.utilization_pct,
            }
            for h in report.health
        ],
        "reason": report.reason,
    }
