"""Money's one unit and its one spelling for people.

Every amount in the ledger, the API and the database is an integer of micro-USD
(design/money.md: one unit everywhere, never floats). People type and read dollars: this module
turns one into the other, exactly, with Decimal. Pure: no database, no Django.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICRO_PER_USD = 1_000_000
# The largest single payment (top-up, payout, form amount): one million USD. Larger is a typo.
MAX_PAYMENT = 1_000_000 * MICRO_PER_USD
# Ledger columns are 64-bit signed; an operator grant leaves room for the balance it lands in.
MAX_POSTING = 2**62
# The most a listing may ask, per GPU-hour and per GiB: 10,000 USD each. With at most 1,024 GPUs
# and MOLT_MAX_ORDER_HOURS (720 by default) hours, the largest hold is under 2**53 micro-USD,
# so no sum downstream (hold, fee, settlement) comes near a bigint. Bounded where prices enter.
MAX_PRICE = 10_000 * MICRO_PER_USD
CENT = Decimal("0.01")

_DOLLARS = re.compile(r"^\$\s*(?P<a>[^\s$]+)$|^(?P<b>[^\s$]+)\s*usd$", re.IGNORECASE)
_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def usd_to_micro(amount: Decimal) -> int:
    """Dollars to micro-USD. Exact for the forms' amounts (at most 6 decimal places); anything
    finer is cut off, so a form must refuse it first (DecimalField(decimal_places=6))."""
    return int(amount * MICRO_PER_USD)


def micro_to_usd(micro: int) -> Decimal:
    """Micro-USD to dollars, without trailing zeros (for a form's initial value)."""
    return (Decimal(micro) / MICRO_PER_USD).normalize()


def _figure(amount: Decimal, places: int) -> str:
    """`1,234.5600` style: thousands grouped, exactly `places` decimals (already rounded)."""
    return f"{amount:,.{places}f}"


def _exact(micro: int, min_places: int) -> str:
    """Every digit the amount has (at most 6 decimals), at least `min_places` of them."""
    text = f"{Decimal(abs(micro)) / MICRO_PER_USD:,.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(min_places, '0')}"


def format_usd(micro: int, *, exact: bool = False, code: bool = False) -> str:
    """An amount (a balance, a hold, a charge, a fee, a refund, a total) for people.

    Dollars and cents, rounded half up: `$2.49`, `-$12,500.00`, `$1.33` for 1,331,644. An
    amount that is not zero but less than one cent keeps its own figure (`$0.008356`), so a
    small charge never reads as `$0.00`. With `exact`, every digit the amount has, at least
    cents (`$499.996644`): for messages that compare two amounts, where rounding could make
    them look equal. With `code`, `2.49 USD` (for text where a `$` reads badly, such as a
    command's output). docs/money.md states the rule."""
    amount = int(micro)
    sign = "-" if amount < 0 else ""
    if exact or 0 < abs(amount) < MICRO_PER_USD // 100:
        figure = _exact(amount, 2)
    else:
        cents = (Decimal(abs(amount)) / MICRO_PER_USD).quantize(CENT, rounding=ROUND_HALF_UP)
        figure = _figure(cents, 2)
    return f"{sign}{figure} USD" if code else f"{sign}${figure}"


# Unit prices are never rounded (two different prices must never read the same), and are
# shown with a fixed least number of decimals per unit, so a column of them lines up: per
# GPU-hour in cents (`$2.49`), per GiB to the tenth of a cent (`$0.010`, `$0.012`), which is
# where per-GiB prices live. Finer prices show their further digits (`$0.0125`).
PRICE_PLACES = {"hour": 2, "gib": 3}


def format_price(micro: int, unit: str = "hour") -> str:
    """A unit price (`unit` "hour": per GPU-hour; "gib": per GiB of traffic), exact, with at
    least PRICE_PLACES[unit] decimals: `$2.49`, `$0.010`, `$0.0125`."""
    amount = int(micro)
    sign = "-" if amount < 0 else ""
    return f"{sign}${_exact(amount, PRICE_PLACES[unit])}"


def parse_amount(text: str, *, maximum: int = MAX_POSTING) -> int:
    """The positive amount `text` names, in micro-USD: an integer of micro-USD (`25000000`), or
    dollars written `25usd`, `25.50 USD` or `$25.50`. Dollars are converted exactly: an amount
    finer than one micro-USD is refused rather than rounded, because whoever typed it meant
    something else. Raises ValueError with a message for a person."""
    # Underscores group digits as in Python; commas are refused, since "1,5" means 1.5 in
    # half the world.
    raw = text.strip().replace("_", "")
    dollars = _DOLLARS.match(raw)
    number = (dollars.group("a") or dollars.group("b")) if dollars else raw
    if not _DECIMAL.match(number):
        raise ValueError(
            f"{text!r} is not an amount: write micro-USD as an integer (25000000) "
            "or dollars as 25usd or $25.50"
        )
    if dollars:
        try:
            micro = Decimal(number) * MICRO_PER_USD
        except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
            raise ValueError(f"{text!r} is not an amount") from None
        if micro != micro.to_integral_value():
            raise ValueError(f"{text!r} is finer than one micro-USD (0.000001 USD)")
        amount = int(micro)
    else:
        if "." in number:
            raise ValueError(
                f"{text!r}: a bare number is micro-USD and must be an integer; "
                "for dollars write it with a usd suffix or a $ prefix"
            )
        amount = int(number)
    if amount <= 0:
        raise ValueError(f"{text!r}: the amount must be positive")
    if amount > maximum:
        raise ValueError(f"{text!r} is more than the ledger can hold in one posting")
    return amount
