"""Turning cumulative WireGuard counters into billable deltas: pure.

WireGuard's per-peer rx/tx restart from zero when a peer is re-added, re-keyed or the interface
is recreated. The agent reports an epoch with the counters and bumps it on every such restart;
the gateway also treats any decrease as a restart (belt and braces for an agent that lost its
epoch file). Deltas are never negative and a byte is never counted twice.

Samples can arrive out of order: an old connection's consumer may still be working through its
backlog while the agent's new connection sends, and a late sample of a previous boot may come
after the new boot's. A lower reading of the same epoch that is only *older* must not pass for
a restart; `stale` tells them apart (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Counters:
    epoch: int
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class Origin:
    """Which sample a reading came from: the agent process (boot_id), its seq in that process,
    and when the agent took it (the agent's clock, whole seconds)."""

    boot_id: str
    seq: int
    sampled_at: datetime


def stale(
    previous: Counters, previous_from: Origin | None, current: Counters, current_from: Origin
) -> bool:
    """Whether `current` is older than the base `previous` it would be compared with, so that it
    must count nothing and leave the base alone (an older epoch is `delta`'s business).

    Within one epoch and one boot, seq orders the samples: a lower seq is stale. Across boots
    seq says nothing (each boot counts from 1), and the agent keeps epochs across restarts
    (clawnode.journal), so a new boot can continue an epoch whose counters go on from the
    device's. The one order knowable across boots is the agent's clock: a reading taken before
    the base's is stale, and so is one taken in the same second that is lower (within an epoch
    the device's counters only grow, so of two readings in one second the lower is the older).
    Everything else, a lower reading taken later included, goes to `delta` as before.

    Skipping a stale reading loses no byte: the counters are cumulative within an epoch, so the
    later reading already taken as the base (or the next one, if the clock went back between
    boots) carries every byte the stale one showed."""
    if previous_from is None or current.epoch != previous.epoch:
        return False
    if current_from.boot_id == previous_from.boot_id:
        return current_from.seq < previous_from.seq
    if current_from.sampled_at != previous_from.sampled_at:
        return current_from.sampled_at < previous_from.sampled_at
    return current.rx_bytes < previous.rx_bytes or current.tx_bytes < previous.tx_bytes


def delta(previous: Counters | None, current: Counters) -> tuple[int, int]:
    """(rx, tx) bytes counted since `previous`. A new epoch, or counters lower than before,
    mean the counters restarted at zero, so everything they now show is new traffic. A sample
    from an older epoch than `previous` is stale (arrived late) and counts nothing."""
    if previous is None:
        return current.rx_bytes, current.tx_bytes
    if current.epoch < previous.epoch:
        return 0, 0
    if current.epoch > previous.epoch:
        return current.rx_bytes, current.tx_bytes
    rx = current.rx_bytes - previous.rx_bytes
    tx = current.tx_bytes - previous.tx_bytes
    if rx < 0 or tx < 0:
        # Same epoch but lower: a restart the agent could not see. Count from zero.
        return current.rx_bytes, current.tx_bytes
    return rx, tx
