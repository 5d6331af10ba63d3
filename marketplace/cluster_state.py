"""A multi-node order's state, derived from its parts' states: pure, no database.

The cluster stores no state of its own: each part is an Order with the single-node lifecycle,
and what the buyer sees of the whole is a function of those (plus whether a lost part ended the
job). Stored twice, the two could disagree; derived, they cannot.

    pending       every part pending
    provisioning  some part not yet running (none lost, none stopping)
    running       every part running: the job is usable as ordered
    degraded      some part ended, the rest run (on_part_loss="degrade")
    stopping      some part stopping, or a lost part ended the job and the rest are being ended
    completed     every part ended and at least one completed (was stopped and settled)
    failed        every part ended, none completed, or a lost part ended the job
    cancelled     every part cancelled before it ran
"""

from __future__ import annotations

from collections.abc import Sequence

LIVE = frozenset({"pending", "provisioning", "running", "stopping"})
# Ended states in which the part was stopped as asked and settled: disputes come after that.
COMPLETED = frozenset({"completed", "disputed", "resolved"})

STATES = (
    "pending",
    "provisioning",
    "running",
    "degraded",
    "stopping",
    "completed",
    "failed",
    "cancelled",
)


def derive(part_states: Sequence[str], *, ended_by_loss: bool = False) -> str:
    """The cluster's state from its parts' states (see the module docstring)."""
    if not part_states:
        raise ValueError("a cluster has at least one part")
    live = [s for s in part_states if s in LIVE]
    if not live:
        if all(s == "cancelled" for s in part_states):
            return "cancelled"
        if ended_by_loss or not any(s in COMPLETED for s in part_states):
            return "failed"
        return "completed"
    if ended_by_loss or "stopping" in live:
        return "stopping"
    if len(live) < len(part_states):
        # A part ended while others live: lost (degrade mode), or stopped by the buyer alone.
        return "degraded" if all(s == "running" for s in live) else "provisioning"
    if all(s == "pending" for s in live):
        return "pending"
    if all(s == "running" for s in live):
        return "running"
    return "provisioning"


def all_ended(part_states: Sequence[str]) -> bool:
    return not any(s in LIVE for s in part_states)


# For the API schema (config.settings SPECTACULAR_SETTINGS names it ClusterStateEnum).
CHOICES = [(state, state) for state in STATES]
