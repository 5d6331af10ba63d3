"""marketplace.money: the one place dollars become micro-USD and back."""

from __future__ import annotations

from decimal import Decimal

import pytest

from marketplace.money import MICRO_PER_USD, format_usd, micro_to_usd, parse_amount, usd_to_micro

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize(
    ("micro", "shown"),
    [
        (0, "$0.00"),
        (2_490_000, "$2.49"),
        (5_000, "$0.005"),
        (12_500 * MICRO_PER_USD, "$12,500.00"),
        (-1_500_000, "-$1.50"),
        (1, "$0.000001"),
    ],
)
def test_format_usd_shows_cents_and_every_further_digit(micro, shown):
    assert format_usd(micro) == shown
    assert format_usd(micro, code=True) == shown.replace("$", "") + " USD"


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("25000000", 25_000_000),
        ("25usd", 25_000_000),
        ("25.50 USD", 25_500_000),
        ("$25.50", 25_500_000),
        ("$0.000001", 1),
        ("1_000", 1_000),
    ],
)
def test_parse_amount_reads_micro_usd_or_dollars_exactly(text, micro):
    assert parse_amount(text) == micro


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("$0.0000001", "finer than one micro-USD"),
        ("2.5", "must be an integer"),
        ("1,5usd", "not an amount"),
        ("0", "must be positive"),
        (str(2**62 + 1), "more than the ledger"),
    ],
)
def test_parse_amount_refuses_what_a_person_did_not_mean(text, words):
    with pytest.raises(ValueError, match=words):
        parse_amount(text)


def test_dollars_and_micro_usd_round_trip():
    assert usd_to_micro(Decimal("2.490000")) == 2_490_000
    assert micro_to_usd(2_490_000) == Decimal("2.49")
    assert usd_to_micro(micro_to_usd(5_000)) == 5_000
