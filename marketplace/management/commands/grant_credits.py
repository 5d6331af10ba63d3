"""`manage.py grant_credits USER AMOUNT`: an operator puts credits into a user's wallet.

AMOUNT is an integer of micro-USD (the ledger's unit), or dollars written `25usd`, `25.50 USD`
or `$25.50`. Dollars are converted with Decimal, exactly: an amount finer than one micro-USD is
refused rather than rounded, because an operator who typed it meant something else.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from marketplace import ledger
from marketplace.money import format_usd, parse_amount


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
        # Money reads as money (issue 12), here too: dollars with every digit the amount has,
        # so an integer of micro-USD typed in comes back exactly, without the ledger's unit.
        granted = format_usd(micro, exact=True, code=True)
        available = format_usd(balance, exact=True, code=True)
        self.stdout.write(
            f"granted {granted} to {account_owner.username}; available balance {available}"
        )
