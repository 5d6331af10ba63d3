"""Template filters for money: amounts are integers of micro-USD everywhere; people read USD."""

from __future__ import annotations

from decimal import Decimal

from django import template

register = template.Library()

MICRO_PER_USD = 1_000_000


@register.filter
def usd(micro: int | None) -> str:
    """`$2.49`, `$0.005`, `$12,500.00`: at least cents, and every further digit the amount has,
    so a price of 5,000 micro-USD per GiB does not show as `$0.01` or `$0.00`."""
    if micro is None or micro == "":
        return ""
    amount = int(micro)
    sign = "-" if amount < 0 else ""
    text = f"{Decimal(abs(amount)) / MICRO_PER_USD:,.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{sign}${whole}.{frac.ljust(2, '0')}"
