"""Turning cumulative WireGuard counters into billable deltas: pure.

WireGuard's per-peer rx/tx restart from zero when a peer is re-added, re-keyed or the interface
is recreated. The agent reports an epoch with the counters and bumps it on every such restart;
the gateway also treats any decrease as a restart (belt and braces for an agent that lost its
epoch file). Deltas are never negative and a byte is never counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counters:
    epoch: int
    rx_bytes: int
    tx_bytes: int


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
