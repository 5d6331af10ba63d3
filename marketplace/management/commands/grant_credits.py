"""`manage.py grant_credits USER AMOUNT`: an operator puts credits into a user's wallet.

AMOUNT is an integer of micro-USD (the ledger's unit), or dollars written `25usd`, `25.50 USD`
or `$25.50`. Dollars are converted with Decimal, exactly: an amount finer than one micro-USD is
refused rather than rounded, because an operator who typed it meant something else.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from marketplace import ledger

MICRO_PER_USD = 1_000_000
MAX_AMOUNT = 2**62  # ledger columns are 64-bit signed; leave room for the balance it lands in

_DOLLARS = re.compile(r"^\$\s*(?P<a>[^\s$]+)$|^(?P<b>[^\s$]+)\s*usd$", re.IGNORECASE)
_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def parse_amount(text: str) -> int:
    """The amount `text` names, in micro-USD. Raises ValueError with a message for a person."""
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
    if amount > MAX_AMOUNT:
        raise ValueError(f"{text!r} is more than the ledger can hold in one posting")
    return amount


def format_usd(micro: int) -> str:
    """`525.50 USD`: at least cents, more decimals only where the amount has them."""
    text = f"{Decimal(micro) / MICRO_PER_USD:,.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')} USD"


class Command(BaseCommand):
    help = (
        "Grant credits to a user's wallet (a ledger transaction from the outside-world "
        "account). AMOUNT: integer micro-USD, or dollars as 25usd / $25.50."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("user", help="username")
        parser.add_argument("amount", help="micro-USD (integer), or dollars: 25usd, $25.50")
        parser.add_argument("--memo", default="operator grant", help="ledger memo")

    def handle(self, *args, user: str, amount: str, memo: str, **options) -> None:
        try:
            micro = parse_amount(amount)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        try:
            account_owner = get_user_model().objects.get(username=user)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user named {user!r}") from None
        ledger.grant_credits(account_owner, micro, memo=memo[:200])
        balance = ledger.available_for(account_owner)
        self.stdout.write(
            f"granted {format_usd(micro)} ({micro} micro-USD) to {account_owner.username}; "
            f"available balance {format_usd(balance)} ({balance} micro-USD)"
        )
