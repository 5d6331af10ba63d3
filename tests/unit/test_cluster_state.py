"""A multi-node order's state from its parts' (marketplace.cluster_state): pure."""

from __future__ import annotations

import pytest

from marketplace.cluster_state import STATES, all_ended, derive

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize(
    ("parts", "loss", "expected"),
    [
        (["pending", "pending"], False, "pending"),
        (["pending", "provisioning"], False, "provisioning"),
        (["running", "provisioning"], False, "provisioning"),  # not until every part is ready
        (["running", "running", "running"], False, "running"),
        (["failed", "running"], False, "degraded"),
        (["completed", "running"], False, "degraded"),
        (["failed", "provisioning"], False, "provisioning"),
        (["failed", "running"], True, "stopping"),  # a loss under "end": the rest are ending
        (["stopping", "running"], False, "stopping"),
        (["completed", "completed"], False, "completed"),
        (["failed", "completed"], False, "completed"),  # degraded, then stopped as asked
        (["failed", "completed"], True, "failed"),
        (["failed", "cancelled"], False, "failed"),
        (["cancelled", "cancelled"], False, "cancelled"),
        (["disputed", "resolved"], False, "completed"),
    ],
)
def test_the_state_is_derived_from_the_parts(parts, loss, expected):
    assert derive(parts, ended_by_loss=loss) == expected
    assert expected in STATES
    assert all_ended(parts) == (expected in ("completed", "failed", "cancelled"))


def test_a_cluster_has_at_least_one_part():
    with pytest.raises(ValueError):
        derive([])
