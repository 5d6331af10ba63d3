"""Read side of a buyer's order for the order page and its live channel: the order as its owner
may see it, the snapshot pushed over the websocket, and the bandwidth samples of its chart."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from django.db.models import F, Window
from django.db.models.functions import Mod, RowNumber
from django.utils import timezone

from frontend.charts import Interval, key_intervals
from marketplace.connect import sandbox_of
from marketplace.models import Order
from meshnet.metering import Counters
from meshnet.models import JobPeer, JobPeerKey, MeteringSample, Sandbox
from meshnet.relays import path_of

# Enough points for a 640-pixel-wide chart; a month-long order at one sample every ten seconds
# has a quarter of a million samples, and only every n-th is read (see usage_intervals).
MAX_CHART_SAMPLES = 240
# Samples arrive a little before the ack and after the stop: keep the edges of the order.
SAMPLE_MARGIN = timedelta(minutes=1)

S = Order.State
STEPS = ("pending", "provisioning", "running", "stopping", "completed")


def order_for(user, order_id: int) -> Order | None:
    """`user`'s order `order_id` with what its page shows, or None for anyone else's (a
    stranger's order and a missing one look the same)."""
    if not getattr(user, "is_authenticated", False):
        return None
    return (
        Order.objects.for_buyer(user)
        .select_related("listing__node", "job_peer__relay_allocation__relay", "settlement")
        .filter(pk=order_id)
        .first()
    )


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


_READ = object()


def snapshot(order: Order, sandbox: Sandbox | object | None = _READ) -> dict[str, Any]:
    """What the order page needs to redraw its live parts. Never holds a private key: the
    server never had one. `sandbox`: the order's Sandbox row (or None) when the caller has
    read it already; read here otherwise."""
    peer = order.job_peer if order.job_peer_id else None
    node = order.listing.node
    settled = getattr(order, "settlement", None) is not None
    return {
        "type": "order",
        "id": order.pk,
        "state": order.state,
        "reason": order.reason,
        "wireguard_public_key": order.wireguard_public_key,
        "job_address": peer.address if peer else None,
        "provider_address": node.mesh_address if peer else None,
        # Direct, or through which relay (meshnet.relays, docs/nat.md).
        "path": path_label(path := path_of(peer)),
        # The node's latest ping of the buyer's tunnel address, with its age (meshnet.round_trips).
        "round_trip": round_trip_view(path["round_trip"] if path else None),
        # The node has the current key once its agent acknowledged the revision that added it.
        "peer_applied": bool(peer and peer.state == JobPeer.State.ACTIVE),
        "bytes_in": order.bytes_in,
        "bytes_out": order.bytes_out,
        "running_since": _iso(order.running_since),
        "ends_at": _iso(order.ends_at),
        "ended_at": _iso(order.ended_at),
        "settled": settled,
        "can_download": peer is not None and order.state in (S.PROVISIONING, S.RUNNING),
        "can_stop": order.state in (S.PENDING, S.PROVISIONING, S.RUNNING),
        "can_rekey": order.state in (S.PENDING, S.PROVISIONING, S.RUNNING),
        # Enough for the page to know its server-rendered Connect panel is stale.
        "sandbox": _sandbox_summary(sandbox_of(order.pk) if sandbox is _READ else sandbox),
    }


def path_label(path: dict | None) -> str | None:
    """The path as words: direct, or relayed via eu-1 (eu-west); None before provisioning."""
    if path is None:
        return None
    if path["kind"] != "relayed":
        return path["kind"]
    where = f" ({path['region']})" if path["region"] else ""
    return f"relayed via {path['relay']}{where}"


def round_trip_view(round_trip: dict | None, now: datetime | None = None) -> dict | None:
    """The round trip as the order page shows it: `text` (12 ms, 0.4 ms, or no answer), `at`
    (when measured, for the page's script to age it) and `label` (the text with its age now)."""
    if round_trip is None:
        return None
    ms = round_trip["ms"]
    if ms is None:
        text = "no answer"
    elif ms < 10:
        text = f"{ms:.1f} ms"
    else:
        text = f"{round(ms)} ms"
    at = round_trip["measured_at"]
    seconds = max(0, int(((now or timezone.now()) - at).total_seconds()))
    return {"text": text, "at": at.isoformat(), "label": f"{text} (measured {age(seconds)} ago)"}


def age(seconds: int) -> str:
    """An age in words, as order.js writes it too: 40 s, 5 min, 3 h."""
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _sandbox_summary(sandbox) -> dict[str, Any] | None:
    if sandbox is None:
        return None
    return {"state": sandbox.state, "progress": sandbox.progress, "at": _iso(sandbox.reported_at)}


def usage_intervals(order: Order) -> list[Interval]:
    """Traffic of the order's peer, over every key it has had (a re-key adds one), between
    metering samples of its node while the order ran, from at most MAX_CHART_SAMPLES samples
    spread evenly over the order (counters are cumulative, so skipping samples loses no bytes,
    only detail). A key's counters count in the samples the gateway received while that key was
    open for the peer (from active_from until closed_at, as billing attributes them), so a key
    reused by another order later is not charted here. Three queries."""
    if order.running_since is None or order.job_peer_id is None:
        return []
    keys = list(
        JobPeerKey.objects.filter(job_peer_id=order.job_peer_id).values_list(
            "pk", "public_key", "active_from", "closed_at"
        )
    )
    samples = MeteringSample.objects.filter(
        node_id=order.listing.node_id, sampled_at__gte=order.running_since - SAMPLE_MARGIN
    )
    if order.ended_at is not None:
        samples = samples.filter(sampled_at__lte=order.ended_at + SAMPLE_MARGIN)
    total = samples.count()
    if total < 2:
        return []
    step = math.ceil(total / MAX_CHART_SAMPLES)
    if step > 1:
        samples = samples.annotate(
            n=Window(RowNumber(), order_by=[F("sampled_at").asc(), F("id").asc()])
        ).annotate(every=Mod(F("n"), step))
        samples = samples.filter(every=0)
    rows = samples.order_by("sampled_at", "id").values_list("sampled_at", "received_at", "body")
    points: list[tuple[Any, dict[Any, Counters]]] = []
    for sampled_at, received_at, body in rows:
        open_keys = {
            public_key: pk
            for pk, public_key, active_from, closed_at in keys
            if active_from <= received_at and (closed_at is None or received_at <= closed_at)
        }
        counters: dict[Any, Counters] = {}
        for peer in (body or {}).get("peers", ()):
            pk = open_keys.get(peer.get("public_key"))
            if pk is not None:
                counters[pk] = Counters(
                    int(peer.get("epoch", 0)),
                    int(peer.get("rx_bytes", 0)),
                    int(peer.get("tx_bytes", 0)),
                )
        if counters:
            points.append((sampled_at, counters))
    return key_intervals(points)
