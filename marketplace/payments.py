"""Write paths of money at the edges of an order: top-ups, the provider's frozen share of a
settled order, disputes and payouts. One transaction each; each docstring states its locks.

Where a provider's money is at any moment (every step a balanced ledger transaction):

    settlement --> frozen (one account per order, an EarningsHold)
                     |-- dispute window passes ----------------> earnings   (release_due_earnings)
                     '-- buyer disputes in time --> frozen until an operator resolves:
                                                    refund -> buyer wallet, rest -> earnings
    earnings --> payout (one account per PayoutRequest) --> world (paid) or back to earnings

Why freeze at settlement instead of clawing back from earnings when a dispute arrives: earnings
may have been paid out by then, and a claw-back that can fail would let a dispute find no money
behind it. A frozen share cannot be paid out, so a dispute in the window always has the
provider's share to draw on. A refund may exceed that share up to what was captured; the rest
comes back out of the platform fee, so the buyer can get back everything they paid and money
is never created: every refund is a transfer out of the frozen account and the fees account.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from marketplace import billing, ledger, lifecycle
from marketplace.errors import AlreadyResolved, InvalidTransition, MarketError
from marketplace.models import (
    Account,
    Dispute,
    EarningsHold,
    LedgerTransaction,
    Order,
    PayoutRequest,
)
from marketplace.money import MAX_PAYMENT, format_usd
from marketplace.text import check_visible_text

S = Order.State


def _check_amount(amount: int, field: str = "amount") -> None:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise MarketError(f"{field} must be a whole number of millionths of a dollar", field=field)
    if not 0 < amount <= MAX_PAYMENT:
        raise MarketError(
            f"{field} must be between $0.000001 and {format_usd(MAX_PAYMENT)}", field=field
        )


# --- top-ups ---------------------------------------------------------------------------------


def top_up(user, amount: int, *, by) -> LedgerTransaction:
    """Credit `user`'s wallet with `amount` from the outside world, as operator `by` (or `user`
    themselves where self top-ups are allowed: see api.wallet_views.TopUpView). One GRANT
    transaction saying who did it; locks the wallet and world account rows."""
    _check_amount(amount)
    who = "self" if by.pk == user.pk else f"operator {by.get_username()}"
    return ledger.grant_credits(user, amount, memo=f"top-up by {who}")


# --- the frozen provider share -----------------------------------------------------------------


def release_due_earnings(now: datetime | None = None) -> int:
    """Release every frozen share whose dispute window has passed without a dispute to its
    provider's earnings; returns how many. One transaction per share.

    Locks: the EarningsHold row (a dispute opened at the same moment locks it too: whichever
    commits first wins, the other sees the new state), then the two accounts. The transaction's
    once_key "earnings:<id>" makes a second release impossible even past the lock."""
    now = now or timezone.now()
    due = EarningsHold.objects.filter(
        state=EarningsHold.State.FROZEN, release_after__lte=now
    ).order_by("pk")
    released = 0
    for hold_id in list(due.values_list("pk", flat=True)):
        with transaction.atomic():
            hold = (
                EarningsHold.objects.select_for_update()
                .select_related("account", "provider")
                .get(pk=hold_id)
            )
            if hold.state != EarningsHold.State.FROZEN or hold.release_after > now:
                continue
            txn = ledger.post(
                LedgerTransaction.Kind.EARNED,
                [
                    (hold.account, -hold.amount),
                    (ledger.earnings_account(hold.provider), hold.amount),
                ],
                memo=f"dispute window of order {hold.order_id} passed",
                once_key=f"earnings:{hold.pk}",
            )
            EarningsHold.objects.filter(pk=hold.pk, state=EarningsHold.State.FROZEN).update(
                state=EarningsHold.State.RELEASED, resolved_at=now, resolution=txn
            )
            released += 1
    return released


# --- disputes ------------------------------------------------------------------------------------


class DisputeRefused(InvalidTransition):
    code = "not_disputable"


def open_dispute(order: Order, buyer, reason: str, *, now: datetime | None = None) -> Dispute:
    """The buyer disputes a settled order while its dispute window is open. The provider's
    share stays frozen until an operator resolves it; the order goes to `disputed`.

    Refused (DisputeRefused, 409; nothing written) when the order is not `buyer`'s, was not
    charged (never settled, or nothing captured), was already disputed, or its window closed.
    Locks: the order row, then its EarningsHold row."""
    now = now or timezone.now()
    reason = (reason or "").strip()
    if not reason:
        raise MarketError("say what went wrong", field="reason")
    if len(reason) > 2000:
        raise MarketError("reason is at most 2000 characters", field="reason")
    check_visible_text(reason, "reason")
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order.pk)
        if order.buyer_id != buyer.pk:
            raise MarketError(f"unknown order {order.pk}", field="order")
        hold = EarningsHold.objects.select_for_update().filter(order=order).first()
        refusal = why_not_disputable(order, hold, now)
        if refusal is not None or hold is None:
            raise DisputeRefused(refusal or f"order {order.pk} was not charged")
        EarningsHold.objects.filter(pk=hold.pk, state=EarningsHold.State.FROZEN).update(
            state=EarningsHold.State.DISPUTED
        )
        dispute = Dispute.objects.create(order=order, buyer=buyer, reason=reason, opened_at=now)
        if not lifecycle.transition(order, order.state, S.DISPUTED, "disputed by the buyer"):
            raise InvalidTransition(f"order {order.pk} changed meanwhile")
        return dispute


def why_not_disputable(order: Order, share: EarningsHold | None, now: datetime) -> str | None:
    """Why the buyer cannot dispute `order` at `now`, or None when they can: the rule
    open_dispute applies, and the order page's (which offers the form only when it holds).
    `share` is the order's EarningsHold (None: the order was never charged)."""
    if order.state in (S.DISPUTED, S.RESOLVED):
        return f"order {order.pk} was already disputed"
    if order.state not in (S.COMPLETED, S.FAILED):
        return f"order {order.pk} is {order.state}: only a settled order"
    if share is None:
        return f"order {order.pk} was not charged: there is nothing to dispute"
    if share.state != EarningsHold.State.FROZEN or now >= share.release_after:
        return (
            f"the dispute window of order {order.pk} closed at "
            f"{share.release_after:%Y-%m-%d %H:%M:%S} UTC"
        )
    return None


def resolve_dispute(dispute: Dispute, *, refund: int, operator, note: str = "") -> Dispute:
    """An operator settles a dispute: `refund` (0 up to what was captured) goes back to the
    buyer, first out of the frozen provider share, beyond it out of the platform fee; the rest of
    the share goes to the provider's earnings. One DISPUTE transaction; the order goes from
    `disputed` to `resolved`. A second resolution raises AlreadyResolved and moves nothing.

    Locks: the order row, the Dispute row, the EarningsHold row, then accounts."""
    if isinstance(refund, bool) or not isinstance(refund, int) or refund < 0:
        raise MarketError(
            "refund must be a whole number of millionths of a dollar, 0 or more", field="refund"
        )
    now = timezone.now()
    with transaction.atomic():
        order = (
            Order.objects.select_for_update(of=("self",))
            .select_related("settlement")
            .get(pk=dispute.order_id)
        )
        locked = Dispute.objects.select_for_update().get(pk=dispute.pk)
        if locked.state != Dispute.State.OPEN:
            raise AlreadyResolved(f"the dispute of order {order.pk} was already resolved")
        hold = (
            EarningsHold.objects.select_for_update()
            .select_related("account", "provider")
            .get(order=order)
        )
        captured = order.settlement.captured
        if refund > captured:
            raise MarketError(
                f"refund {format_usd(refund, exact=True)} is more than the "
                f"{format_usd(captured, exact=True)} captured",
                field="refund",
            )
        from_share = min(refund, hold.amount)
        from_fees = refund - from_share
        txn = ledger.post(
            LedgerTransaction.Kind.DISPUTE,
            [
                (hold.account, -hold.amount),
                (ledger.wallet_account(order.buyer), refund),
                (ledger.earnings_account(hold.provider), hold.amount - from_share),
                (ledger.fees_account(), -from_fees),
            ],
            memo=f"dispute of order {order.pk}: {format_usd(refund)} refunded",
            once_key=f"earnings:{hold.pk}",
        )
        EarningsHold.objects.filter(pk=hold.pk, state=EarningsHold.State.DISPUTED).update(
            state=EarningsHold.State.RESOLVED, resolved_at=now, resolution=txn
        )
        Dispute.objects.filter(pk=locked.pk, state=Dispute.State.OPEN).update(
            state=Dispute.State.RESOLVED,
            refund=refund,
            resolved_at=now,
            resolved_by=operator,
            resolution_note=note[:500],
            resolution=txn,
        )
        why = f"dispute resolved by {operator.get_username()}: {format_usd(refund)} refunded"
        if not lifecycle.transition(order, S.DISPUTED, S.RESOLVED, why):
            raise InvalidTransition(f"order {order.pk} is no longer disputed")
        locked.refresh_from_db()
        return locked


# --- payouts -------------------------------------------------------------------------------------


def request_payout(provider, amount: int) -> PayoutRequest:
    """Set `amount` of the provider's earnings aside for an operator to pay out. Raises
    InsufficientFunds (402, nothing written) when earnings do not cover it; frozen shares
    (dispute window still open) are not earnings yet. Locks: the earnings account row."""
    _check_amount(amount)
    with transaction.atomic():
        account = Account.objects.create(kind=Account.Kind.PAYOUT, user=provider)
        txn = ledger.post(
            LedgerTransaction.Kind.PAYOUT_REQUEST,
            [(ledger.earnings_account(provider), -amount), (account, amount)],
            memo=f"payout requested by {provider.get_username()}",
        )
        return PayoutRequest.objects.create(
            provider=provider, amount=amount, account=account, request_transaction=txn
        )


def _decide_payout(payout: PayoutRequest, *, paid: bool, operator, note: str) -> PayoutRequest:
    with transaction.atomic():
        locked = (
            PayoutRequest.objects.select_for_update()
            .select_related("account", "provider")
            .get(pk=payout.pk)
        )
        if locked.state != PayoutRequest.State.REQUESTED:
            raise AlreadyResolved(f"payout {locked.pk} was already {locked.state}")
        to = ledger.world_account() if paid else ledger.earnings_account(locked.provider)
        txn = ledger.post(
            LedgerTransaction.Kind.PAYOUT if paid else LedgerTransaction.Kind.PAYOUT_REJECTED,
            [(locked.account, -locked.amount), (to, locked.amount)],
            memo=f"payout {locked.pk} {'paid' if paid else 'rejected'}: {note}",
            once_key=f"payout:{locked.pk}",
        )
        PayoutRequest.objects.filter(pk=locked.pk, state=PayoutRequest.State.REQUESTED).update(
            state=PayoutRequest.State.PAID if paid else PayoutRequest.State.REJECTED,
            decided_at=timezone.now(),
            decided_by=operator,
            note=note[:200],
            resolution=txn,
        )
        locked.refresh_from_db()
        return locked


def mark_payout_paid(payout: PayoutRequest, *, operator, reference: str = "") -> PayoutRequest:
    """The operator paid the provider outside the platform: the set-aside amount leaves to the
    outside world. Once (AlreadyResolved after). Locks: the request row, then accounts."""
    return _decide_payout(payout, paid=True, operator=operator, note=reference)


def reject_payout(payout: PayoutRequest, *, operator, reason: str) -> PayoutRequest:
    """The operator refuses the request: the amount goes back to the provider's earnings. Once
    (AlreadyResolved after). Locks: the request row, then accounts."""
    if not (reason or "").strip():
        raise MarketError("say why the payout is rejected", field="reason")
    return _decide_payout(payout, paid=False, operator=operator, note=reason.strip())


# --- receipts --------------------------------------------------------------------------------


def receipt_for(order: Order) -> dict:
    """The itemised receipt of an ended order, from its stored settlement (nothing recomputed
    from live data, so it never changes after settlement but for a dispute's refund). The
    lines sum to `captured`; `captured + released == hold`; `platform_fee + provider_share ==
    captured`. An order that ended without a charge (cancelled, failed before it ran) has no
    lines and released its whole hold. Raises InvalidTransition for a live order."""

    if order.state not in Order.ENDED_STATES:
        raise InvalidTransition(f"order {order.pk} is {order.state}: it is not settled yet")
    settlement = getattr(order, "settlement", None)
    dispute = getattr(order, "dispute", None)
    refunded = dispute.refund if dispute is not None and dispute.refund is not None else 0
    if settlement is None:
        return {
            "order": order.pk,
            "state": order.state,
            "hold": order.hold_amount,
            "lines": [],
            "captured": 0,
            "platform_fee": 0,
            "provider_share": 0,
            "released": order.hold_amount,
            "refunded": 0,
            "net_paid": 0,
            "settled_at": order.ended_at,
        }
    lines = billing.receipt_lines(
        gpu_count=order.gpu_count,
        price_per_gpu_hour=order.price_per_gpu_hour,
        price_per_gib=order.price_per_gib,
        billed_seconds=settlement.billed_seconds,
        offline_seconds=settlement.offline_seconds,
        bandwidth_bytes=settlement.bandwidth_bytes,
        captured=settlement.captured,
    )
    return {
        "order": order.pk,
        "state": order.state,
        "hold": order.hold_amount,
        "lines": [asdict(line) for line in lines],
        "captured": settlement.captured,
        "platform_fee": settlement.fee,
        "provider_share": settlement.provider_amount,
        "released": settlement.released,
        "refunded": refunded,
        "net_paid": settlement.captured - refunded,
        "settled_at": settlement.created_at,
    }
