"""The double-entry ledger: accounts, postings and two-phase escrow holds.

A posting is one LedgerTransaction whose entries sum to zero. Each leg updates the account's
cached balance with a conditional UPDATE (balance + amount >= 0 for every account but the
outside world), so two concurrent debits can never both pass; a failed guard raises
InsufficientFunds and the enclosing transaction rolls back, leaving nothing half-written.
Entries are append-only: triggers installed by migration 0002 refuse UPDATE and DELETE.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, transaction
from django.db.models import F, Sum
from django.utils import timezone

from marketplace.errors import AlreadyResolved, InsufficientFunds
from marketplace.models import Account, EscrowHold, LedgerEntry, LedgerTransaction

Leg = tuple[Account, int]


def _system_account(kind: str) -> Account:
    account, _ = Account.objects.get_or_create(kind=kind, user=None)
    return account


def world_account() -> Account:
    return _system_account(Account.Kind.WORLD)


def fees_account() -> Account:
    return _system_account(Account.Kind.FEES)


def wallet_account(user) -> Account:
    account, _ = Account.objects.get_or_create(kind=Account.Kind.WALLET, user=user)
    return account


def earnings_account(user) -> Account:
    account, _ = Account.objects.get_or_create(kind=Account.Kind.EARNINGS, user=user)
    return account


def post(
    kind: str,
    legs: Iterable[Leg],
    *,
    memo: str = "",
    resolves_hold: EscrowHold | None = None,
) -> LedgerTransaction:
    """Write one balanced transaction. Zero legs are dropped. Raises ValueError when the legs do
    not sum to zero, InsufficientFunds when a debit would take an account below zero, and
    AlreadyResolved when `resolves_hold` already has a resolution.

    Locks: the touched account rows (in primary-key order, so concurrent postings never
    deadlock on each other)."""
    merged: dict[int, tuple[Account, int]] = {}
    for account, amount in legs:
        prev = merged.get(account.pk, (account, 0))[1]
        merged[account.pk] = (account, prev + int(amount))
    if sum(amount for _, amount in merged.values()) != 0:
        raise ValueError(f"{kind} transaction does not balance: {merged}")
    with transaction.atomic():
        try:
            with transaction.atomic():
                txn = LedgerTransaction.objects.create(
                    kind=kind, memo=memo, resolves_hold=resolves_hold
                )
        except IntegrityError:
            raise AlreadyResolved("this hold was already resolved") from None
        entries = []
        for pk in sorted(merged):
            account, amount = merged[pk]
            if amount == 0:
                continue
            guarded = Account.objects.filter(pk=pk)
            if amount < 0 and account.kind != Account.Kind.WORLD:
                guarded = guarded.filter(balance__gte=-amount)
            if guarded.update(balance=F("balance") + amount) != 1:
                raise InsufficientFunds(
                    f"insufficient funds: {account.kind} account cannot cover {-amount} micro-USD"
                )
            entries.append(LedgerEntry(transaction=txn, account_id=pk, amount=amount))
        LedgerEntry.objects.bulk_create(entries)
    return txn


def grant_credits(user, amount: int, memo: str = "operator grant") -> LedgerTransaction:
    """Credits enter from the outside world into `user`'s wallet."""
    if amount <= 0:
        raise ValueError("amount must be a positive number of micro-USD")
    return post(
        LedgerTransaction.Kind.GRANT,
        [(world_account(), -amount), (wallet_account(user), amount)],
        memo=memo,
    )


def place_hold(order, amount: int) -> EscrowHold:
    """Move `amount` from the buyer's wallet into a fresh escrow account for `order`.
    Raises InsufficientFunds (and writes nothing) when the wallet cannot cover it."""
    with transaction.atomic():
        escrow = Account.objects.create(kind=Account.Kind.ESCROW, user=order.buyer)
        post(
            LedgerTransaction.Kind.HOLD,
            [(wallet_account(order.buyer), -amount), (escrow, amount)],
            memo=f"hold for order {order.pk}",
        )
        return EscrowHold.objects.create(order=order, account=escrow, amount=amount)


def resolve_hold(
    hold: EscrowHold, *, captured: int, fee: int, provider, memo: str
) -> LedgerTransaction:
    """Resolve `hold` exactly once: `captured` goes to the provider's earnings less `fee` (to
    platform fees), the rest back to the buyer's wallet. captured == 0 is a full release.

    Locks: the hold row. A second resolution raises AlreadyResolved and moves nothing (the
    unique LedgerTransaction.resolves_hold backs this even without the lock)."""
    if not 0 <= captured <= hold.amount or not 0 <= fee <= captured:
        raise ValueError(f"cannot capture {captured} (fee {fee}) of a {hold.amount} hold")
    with transaction.atomic():
        locked = (
            EscrowHold.objects.select_for_update().select_related("order__buyer").get(pk=hold.pk)
        )
        if locked.state != EscrowHold.State.OPEN:
            raise AlreadyResolved(f"hold of order {locked.order_id} was already {locked.state}")
        kind = LedgerTransaction.Kind.CAPTURE if captured else LedgerTransaction.Kind.RELEASE
        legs: list[Leg] = [
            (locked.account, -locked.amount),
            (wallet_account(locked.order.buyer), locked.amount - captured),
        ]
        if captured:
            legs += [(earnings_account(provider), captured - fee), (fees_account(), fee)]
        txn = post(kind, legs, memo=memo, resolves_hold=locked)
        state = EscrowHold.State.CAPTURED if captured else EscrowHold.State.RELEASED
        EscrowHold.objects.filter(pk=locked.pk, state=EscrowHold.State.OPEN).update(
            state=state, resolved_at=timezone.now()
        )
        return txn


def held_for(user) -> int:
    return (
        EscrowHold.objects.filter(order__buyer=user, state=EscrowHold.State.OPEN).aggregate(
            total=Sum("amount")
        )["total"]
        or 0
    )


def available_for(user) -> int:
    account = Account.objects.filter(kind=Account.Kind.WALLET, user=user).first()
    return account.balance if account else 0
