"""Counter deltas: random cumulative sequences with resets bill exactly the true byte total."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnet.metering import Counters, Origin, delta, stale

pytestmark = [pytest.mark.unit, pytest.mark.property]


def test_first_sample_counts_everything_it_shows():
    assert delta(None, Counters(0, 100, 7)) == (100, 7)


def test_same_epoch_counts_the_growth():
    assert delta(Counters(1, 100, 50), Counters(1, 160, 55)) == (60, 5)


def test_growth_in_one_direction_only_counts_that_growth_not_a_reset():
    # A counter that did not move is no restart: only a lower one is.
    assert delta(Counters(1, 100, 50), Counters(1, 100, 80)) == (0, 30)
    assert delta(Counters(1, 100, 50), Counters(1, 130, 50)) == (30, 0)


def test_new_epoch_counts_from_zero():
    assert delta(Counters(1, 10_000, 10_000), Counters(2, 30, 40)) == (30, 40)


def test_decrease_within_an_epoch_is_a_reset_not_negative_traffic():
    assert delta(Counters(3, 500, 500), Counters(3, 20, 600)) == (20, 600)


def test_sample_from_an_older_epoch_counts_nothing():
    assert delta(Counters(4, 10, 10), Counters(3, 999, 999)) == (0, 0)


SECOND = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("rx", "tx", "is_stale"),
    [
        (90, 90, True),
        # One counter lower is enough: within an epoch neither ever goes down, so the reading
        # cannot be the later one.
        (90, 100, True),
        (100, 90, True),
        # Equal, or one higher and none lower: it may be the later one, so it goes to delta.
        (100, 100, False),
        (100, 150, False),
        (150, 100, False),
    ],
)
def test_of_two_boots_readings_in_the_same_second_a_lower_one_is_stale(rx, tx, is_stale):
    # The agent's clock has whole seconds: two boots' samples can share one, and seq (which each
    # boot counts from 1) says nothing across boots, so the counters decide.
    base, base_from = Counters(5, 100, 100), Origin("boot-a", 900, SECOND)
    current_from = Origin("boot-b", 1, SECOND)
    assert stale(base, base_from, Counters(5, rx, tx), current_from) is is_stale


# One step: some traffic arrives, then possibly the peer is re-added (counters restart, epoch+1).
steps = st.lists(
    st.tuples(st.integers(0, 10**9), st.integers(0, 10**9), st.booleans()), min_size=1, max_size=60
)


@given(steps)
def test_sum_of_deltas_equals_true_traffic_across_resets(sequence):
    epoch, rx, tx = 0, 0, 0
    true_rx = true_tx = billed_rx = billed_tx = 0
    previous = None
    for add_rx, add_tx, reset_after in sequence:
        rx += add_rx
        tx += add_tx
        true_rx += add_rx
        true_tx += add_tx
        current = Counters(epoch, rx, tx)
        d_rx, d_tx = delta(previous, current)
        assert d_rx >= 0 and d_tx >= 0
        billed_rx += d_rx
        billed_tx += d_tx
        previous = current
        if reset_after:
            epoch, rx, tx = epoch + 1, 0, 0
    assert (billed_rx, billed_tx) == (true_rx, true_tx)
