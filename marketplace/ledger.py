"""The double-entry ledger: accounts, postings and two-phase escrow holds.

A posting is one LedgerTransaction whose entries sum to zero. Each leg updates the account's
cached balance with a conditional UPDATE (balance + amount >= 0 for every account but the
outside world), so two concurrent debits can never both pass; a failed guard raises
InsufficientFunds and the enclosing transaction rolls back, leaving nothing half-written.
Entries are append-only: triggers installed by migration 0002 refuse UPDATE and DELETE.
Corrections are reversing transactions (reverse_transaction), never edits.

Exactly-once rules are unique columns of LedgerTransaction, so the second of two racing
resolutions fails at the INSERT and moves nothing: `resolves_hold` (an escrow hold is captured
or released once), `reverses` (a transaction is reversed once) and `once_key` (a frozen provider
share is released or resolved once, a payout request is paid or rejected once).
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from marketplace.errors import AlreadyResolved, InsufficientFunds, MarketError
from marketplace.models import Account, EscrowHold, LedgerEntry, LedgerTransaction
from marketplace.money import format_usd

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
    reverses: LedgerTransaction | None = None,
    once_key: str | None = None,
) -> LedgerTransaction:
    """Write one balanced transaction. Zero legs are dropped. Raises ValueError when the legs do
    not sum to zero, InsufficientFunds when a debit would take an account below zero, and
    AlreadyResolved when `resolves_hold`, `reverses` or `once_key` was already used by another
    transaction.

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
                    kind=kind,
                    memo=memo[:200],
                    resolves_hold=resolves_hold,
                    reverses=reverses,
                    once_key=once_key,
                )
        except IntegrityError:
            what = (
                "this hold was already resolved"
                if resolves_hold is not None
                else f"transaction #{reverses.pk} was already reversed"
                if reverses is not None
                else f"{once_key} was already settled"
            )
            raise AlreadyResolved(what) from None
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
                    f"insufficient funds: {account.kind} account cannot cover "
                    f"{format_usd(-amount, exact=True)}"
                )
            entries.append(LedgerEntry(transaction=txn, account_id=pk, amount=amount))
        LedgerEntry.objects.bulk_create(entries)
    return txn


def grant_credits(user, amount: int, memo: str = "operator grant") -> LedgerTransaction:
    """Credits enter from the outside world into `user`'s wallet."""
    if amount <= 0:
        raise ValueError("amount must be positive")
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
    hold: EscrowHold,
    *,
    captured: int,
    fee: int,
    provider,
    memo: str,
    earnings: Account | None = None,
) -> LedgerTransaction:
    """Resolve `hold` exactly once: `captured` goes to the provider's earnings (or to
    `earnings`, the frozen account settlement uses) less `fee` (to platform fees), the rest back
    to the buyer's wallet. captured == 0 is a full release.

    Locks: the hold row. A second resolution raises AlreadyResolved and moves nothing (the
    unique LedgerTransaction.resolves_hold backs this even without the lock)."""
    if not 0 <= captured <= hold.amount or not 0 <= fee <= captured:
        raise ValueError(f"cannot capture {captured} (fee {fee}) of a {hold.amount} hold")
    with transaction.atomic():
        # of=self: the order is a nullable (outer) join since a hold may be a multi-node
        # order's instead, and PostgreSQL cannot lock the nullable side of an outer join.
        locked = (
            EscrowHold.objects.select_for_update(of=("self",))
            .select_related("order__buyer")
            .get(pk=hold.pk)
        )
        if locked.state != EscrowHold.State.OPEN:
            raise AlreadyResolved(f"hold of order {locked.order_id} was already {locked.state}")
        kind = LedgerTransaction.Kind.CAPTURE if captured else LedgerTransaction.Kind.RELEASE
        legs: list[Leg] = [
            (locked.account, -locked.amount),
            (wallet_account(locked.order.buyer), locked.amount - captured),
        ]
        if captured:
            provider_account = earnings if earnings is not None else earnings_account(provider)
            legs += [(provider_account, captured - fee), (fees_account(), fee)]
        txn = post(kind, legs, memo=memo, resolves_hold=locked)
        state = EscrowHold.State.CAPTURED if captured else EscrowHold.State.RELEASED
        EscrowHold.objects.filter(pk=locked.pk, state=EscrowHold.State.OPEN).update(
            state=state, resolved_at=timezone.now()
        )
        return txn


def held_for(user) -> int:
    """What `user`'s open holds still hold: their escrow accounts' balances, which for a
    multi-node order's hold is its amount less what its ended parts captured already."""
    return (
        EscrowHold.objects.filter(
            Q(order__buyer=user) | Q(cluster__buyer=user), state=EscrowHold.State.OPEN
        ).aggregate(total=Sum("account__balance"))["total"]
        or 0
    )


def available_for(user) -> int:
    account = Account.objects.filter(kind=Account.Kind.WALLET, user=user).first()
    return account.balance if account else 0


# Kinds an operator may reverse directly. Every other kind belongs to a record with a state of
# its own (an escrow hold, a frozen share, a payout request), whose own resolution is the
# correction: reversing such a posting behind its record's back would leave the record and its
# account disagreeing, which the audit reports.
REVERSIBLE_KINDS = frozenset({LedgerTransaction.Kind.GRANT})


def reverse_transaction(txn: LedgerTransaction, memo: str) -> LedgerTransaction:
    """Correct `txn` by posting its exact opposite (every entry negated) as a REVERSAL that
    names it. At most once per transaction (the unique `reverses` column); refused with
    InsufficientFunds, moving nothing, when an account no longer holds what it received (a
    granted wallet already spent the credits). Only REVERSIBLE_KINDS may be reversed."""
    memo = memo.strip()
    if not memo:
        raise MarketError("say why the transaction is reversed", field="memo")
    if txn.kind not in REVERSIBLE_KINDS:
        raise MarketError(
            f"a {txn.kind} transaction is corrected through its own record, not reversed",
            field="transaction",
        )
    legs = [(entry.account, -entry.amount) for entry in txn.entries.select_related("account")]
    return post(
        LedgerTransaction.Kind.REVERSAL,
        legs,
        memo=f"reversal of #{txn.pk}: {memo}",
        reverses=txn,
    )


def frozen_for(user) -> int:
    """Provider shares of `user`'s settled orders still frozen (window open or disputed)."""
    return (
        Account.objects.filter(kind=Account.Kind.FROZEN, user=user).aggregate(t=Sum("balance"))["t"]
        or 0
    )


def payouts_pending_for(user) -> int:
    """Earnings of `user` set aside by payout requests an operator has not decided yet."""
    return (
        Account.objects.filter(kind=Account.Kind.PAYOUT, user=user).aggregate(t=Sum("balance"))["t"]
        or 0
    )


def earnings_for(user) -> int:
    """What `user` as a provider can request to be paid out now."""
    account = Account.objects.filter(kind=Account.Kind.EARNINGS, user=user).first()
    return account.balance if account else 0
