"""Counter deltas: random cumulative sequences with resets bill exactly the true byte total."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnet.metering import Counters, delta

pytestmark = [pytest.mark.unit, pytest.mark.property]


def test_first_sample_counts_everything_it_shows():
    assert delta(None, Counters(0, 100, 7)) == (100, 7)


def test_same_epoch_counts_the_growth():
    assert delta(Counters(1, 100, 50), Counters(1, 160, 55)) == (60, 5)


def test_new_epoch_counts_from_zero():
    assert delta(Counters(1, 10_000, 10_000), Counters(2, 30, 40)) == (30, 40)


def test_decrease_within_an_epoch_is_a_reset_not_negative_traffic():
    assert delta(Counters(3, 500, 500), Counters(3, 20, 600)) == (20, 600)


def test_sample_from_an_older_epoch_counts_nothing():
    assert delta(Counters(4, 10, 10), Counters(3, 999, 999)) == (0, 0)


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
