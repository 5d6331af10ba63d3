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
        (12_500 * MICRO_PER_USD, "$12,500.00"),
        (-1_500_000, "-$1.50"),
        # A balance or a charge reads in cents, rounded half up (the "$499.996644").
        (499_996_644, "$500.00"),
        (1_331_644, "$1.33"),
        (299_000, "$0.30"),
        (1_335_000, "$1.34"),
        (-1_335_000, "-$1.34"),
        (10_000, "$0.01"),
        # Less than a cent but not nothing keeps its figure, so it never reads as $0.00.
        (9_999, "$0.009999"),
        (5_000, "$0.005"),
        (1, "$0.000001"),
        (-8_356, "-$0.008356"),
    ],
)
def test_format_usd_shows_cents_and_small_amounts_whole(micro, shown):
    assert format_usd(micro) == shown
    assert format_usd(micro, code=True) == shown.replace("$", "") + " USD"


@pytest.mark.parametrize(
    ("micro", "shown"),
    [(499_996_644, "$499.996644"), (8_356, "$0.008356"), (2_000_000, "$2.00"), (-5, "-$0.000005")],
)
def test_format_usd_exact_keeps_every_digit(micro, shown):
    assert format_usd(micro, exact=True) == shown


@pytest.mark.parametrize(
    ("micro", "unit", "shown"),
    [
        (2_490_000, "hour", "$2.49"),
        (2_000_000, "hour", "$2.00"),
        (2_495_000, "hour", "$2.495"),
        (10_000, "gib", "$0.010"),
        (12_000, "gib", "$0.012"),
        (12_500, "gib", "$0.0125"),
        (0, "gib", "$0.000"),
        (1, "gib", "$0.000001"),
        (1_000_000_000, "hour", "$1,000.00"),
    ],
)
def test_format_price_is_exact_with_the_units_least_decimals(micro, unit, shown):
    from marketplace.money import format_price

    assert format_price(micro, unit) == shown


def test_two_different_prices_never_read_the_same():
    from marketplace.money import format_price

    prices = range(0, 100_000, 7)
    assert len({format_price(p, "gib") for p in prices}) == len(prices)


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
