"""The reliability score: job success times uptime, as an integer percentage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketplace.reliability import score, uptime_bp

pytestmark = [pytest.mark.unit]

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OFFLINE_AFTER = timedelta(seconds=45)


def test_score_multiplies_success_and_uptime_rounding_half_up():
    assert score(completed=3, failed=1, uptime=9000) == 68  # 67.5
    assert score(completed=1, failed=0, uptime=10_000) == 100
    assert score(completed=0, failed=5, uptime=10_000) == 0
    assert score(completed=0, failed=0, uptime=8000) == 80  # no jobs yet: success counts as 1


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 10_000))
def test_score_is_between_0_and_100_and_never_above_either_factor(completed, failed, uptime):
    value = score(completed=completed, failed=failed, uptime=uptime)
    assert 0 <= value <= 100
    assert value <= round(100 * uptime / 10_000) + 1


def test_uptime_counts_outages_and_a_silence_going_on_now():
    now = T0 + timedelta(hours=1)
    outages = [(T0 + timedelta(minutes=10), T0 + timedelta(minutes=16))]
    assert (
        uptime_bp(
            window_start=T0,
            now=now,
            outages=outages,
            last_seen_at=now,
            offline_after=OFFLINE_AFTER,
        )
        == 9000
    )
    silent = uptime_bp(
        window_start=T0,
        now=now,
        outages=outages,
        last_seen_at=now - timedelta(minutes=12),
        offline_after=OFFLINE_AFTER,
    )
    assert silent == 7000
    never = uptime_bp(
        window_start=T0, now=now, outages=[], last_seen_at=None, offline_after=OFFLINE_AFTER
    )
    assert never == 0
