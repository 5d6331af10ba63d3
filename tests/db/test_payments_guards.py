"""The guards of marketplace/payments.py that the API tests of test_payments.py go past: the
bounds of an amount, a refund and a reason, who is named on the ledger and the records, and when.
Each test here was written for a mutant of payments.py that the rest of the suite let live
(docs/testing.md, "payments"); each states the money rule it holds."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from marketplace import ledger, payments
from marketplace.audit import audit_ledger
from marketplace.errors import AlreadyResolved, InvalidTransition, MarketError
from marketplace.models import Dispute, EarningsHold, LedgerTransaction, Order, PayoutRequest
from marketplace.money import MAX_PAYMENT, format_usd
from tests.db.settled_orders import balances, placed_order, settled_order

pytestmark = [pytest.mark.db, pytest.mark.django_db]


# --- amounts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [True, False, 1.0, "5", None, 0, -1, MAX_PAYMENT + 1])
def test_a_top_up_of_anything_but_1_to_max_micro_usd_is_refused_naming_the_amount(buyer, amount):
    # True is an int to Python; a wallet credited with "True" micro-USD is a bug somewhere.
    with pytest.raises(MarketError) as refused:
        payments.top_up(buyer, amount, by=buyer)
    assert refused.value.field == "amount"
    assert "amount must be" in str(refused.value)
    assert not LedgerTransaction.objects.exists()


def test_a_top_up_of_exactly_1_or_max_micro_usd_is_credited(buyer):
    payments.top_up(buyer, 1, by=buyer)
    payments.top_up(buyer, MAX_PAYMENT, by=buyer)
    assert ledger.available_for(buyer) == MAX_PAYMENT + 1
    assert audit_ledger() == []


def test_a_payout_of_a_boolean_or_past_max_is_refused_before_it_touches_earnings(provider):
    for amount in (True, MAX_PAYMENT + 1):
        with pytest.raises(MarketError) as refused:
            payments.request_payout(provider, amount)
        assert refused.value.field == "amount" and refused.value.code == "invalid"
    assert not PayoutRequest.objects.exists()


def test_the_ledger_says_who_topped_a_wallet_up(buyer, make_user):
    own = payments.top_up(buyer, 10, by=buyer)
    olga = make_user("olga", is_staff=True)
    theirs = payments.top_up(buyer, 20, by=olga)
    assert own.memo == "top-up by self"
    assert theirs.memo == "top-up by operator olga"
    assert ledger.available_for(buyer) == 30


# --- the frozen share ---------------------------------------------------------------------------


def test_the_beat_releases_due_shares_by_the_clock_when_given_no_time(
    funded_buyer, provider, listing, node
):
    order = settled_order(funded_buyer, listing, node)
    share = order.earnings_hold
    assert payments.release_due_earnings() == 0  # the window is open now
    EarningsHold.objects.filter(pk=share.pk).update(
        release_after=timezone.now() - timedelta(seconds=1)
    )
    before = timezone.now()

    assert payments.release_due_earnings() == 1

    share.refresh_from_db()
    assert share.state == EarningsHold.State.RELEASED
    assert before <= share.resolved_at <= timezone.now()
    assert share.resolution.memo == f"dispute window of order {order.pk} passed"
    assert ledger.earnings_for(provider) == order.settlement.provider_amount


def test_a_release_records_when_it_happened(funded_buyer, listing, node):
    share = settled_order(funded_buyer, listing, node).earnings_hold
    at = share.release_after + timedelta(hours=5)
    payments.release_due_earnings(now=at)
    share.refresh_from_db()
    assert share.resolved_at == at


def test_shares_are_released_each_to_its_own_provider_and_counted(
    funded_buyer, provider, listing, node
):
    first = settled_order(funded_buyer, listing, node)
    second = settled_order(funded_buyer, listing, node)
    latest = max(first.earnings_hold.release_after, second.earnings_hold.release_after)
    assert payments.release_due_earnings(now=latest) == 2
    assert ledger.earnings_for(provider) == (
        first.settlement.provider_amount + second.settlement.provider_amount
    )
    assert audit_ledger() == []


def test_a_share_disputed_after_the_beat_listed_it_is_not_released(
    funded_buyer, provider, listing, node
):
    # The beat lists the due shares, then locks and releases each in turn; a buyer who disputes
    # one of them in between (their request came in before its window closed) must keep it
    # frozen: releasing it would pay the provider money the dispute may refund.
    first = settled_order(funded_buyer, listing, node)
    second = settled_order(funded_buyer, listing, node)
    third = settled_order(funded_buyer, listing, node)
    due = max(o.earnings_hold.release_after for o in (first, second, third))
    post = ledger.post
    disputes = []

    def post_then_the_buyer_disputes(*args, **kwargs):
        txn = post(*args, **kwargs)
        if not disputes:
            late = second.earnings_hold.release_after - timedelta(seconds=1)
            disputes.append(payments.open_dispute(second, funded_buyer, "broken", now=late))
        return txn

    with mock.patch.object(ledger, "post", post_then_the_buyer_disputes):
        assert payments.release_due_earnings(now=due) == 2  # the beat goes on past it

    assert EarningsHold.objects.get(order=second).state == EarningsHold.State.DISPUTED
    assert EarningsHold.objects.get(order=third).state == EarningsHold.State.RELEASED
    assert ledger.earnings_for(provider) == (
        first.settlement.provider_amount + third.settlement.provider_amount
    )
    assert ledger.frozen_for(provider) == second.settlement.provider_amount
    assert audit_ledger() == []


# --- disputes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_a_dispute_without_a_reason_is_refused_naming_the_reason(
    funded_buyer, listing, node, reason
):
    order = settled_order(funded_buyer, listing, node)
    with pytest.raises(MarketError) as refused:
        payments.open_dispute(order, funded_buyer, reason)
    assert refused.value.field == "reason"
    assert str(refused.value) == "say what went wrong"
    assert not Dispute.objects.exists()


def test_a_dispute_reason_is_at_most_2000_characters_and_kept_trimmed(funded_buyer, listing, node):
    order = settled_order(funded_buyer, listing, node)
    with pytest.raises(MarketError) as refused:
        payments.open_dispute(order, funded_buyer, "x" * 2001)
    assert refused.value.field == "reason"
    assert str(refused.value) == "reason is at most 2000 characters"
    assert not Dispute.objects.exists()

    now = timezone.now()
    dispute = payments.open_dispute(order, funded_buyer, "  " + "y" * 2000 + "\n", now=now)
    dispute.refresh_from_db()
    assert dispute.reason == "y" * 2000
    assert dispute.opened_at == now and dispute.buyer == funded_buyer
    assert Order.objects.get(pk=order.pk).state == "disputed"
    assert order.transitions.last().reason == "disputed by the buyer"


def test_a_dispute_reason_that_hides_characters_is_refused_naming_the_reason(
    funded_buyer, listing, node
):
    # The operator reads the reason to decide a refund: a bidi override could make it say
    # something else than what the buyer typed. The refusal names the form's field, so the
    # page can put it beside the reason box.
    order = settled_order(funded_buyer, listing, node)
    with pytest.raises(MarketError) as refused:
        payments.open_dispute(order, funded_buyer, "never \u202estarted")
    assert refused.value.field == "reason"
    assert str(refused.value) == (
        "reason contains an invisible format character (U+202E) that can disguise what it shows"
    )
    assert not Dispute.objects.exists()
    assert Order.objects.get(pk=order.pk).state == order.state
    assert EarningsHold.objects.get(order=order).state == EarningsHold.State.FROZEN


def test_a_dispute_is_refused_at_the_very_second_the_window_closes(funded_buyer, listing, node):
    order = settled_order(funded_buyer, listing, node)
    share = order.earnings_hold
    closes = share.release_after
    assert payments.why_not_disputable(order, share, closes - timedelta(seconds=1)) is None
    refusal = payments.why_not_disputable(order, share, closes)
    assert refusal == (
        f"the dispute window of order {order.pk} closed at {closes:%Y-%m-%d %H:%M:%S} UTC"
    )
    with pytest.raises(payments.DisputeRefused, match="closed at"):
        payments.open_dispute(order, funded_buyer, "late", now=closes)
    assert not Dispute.objects.exists()
    assert EarningsHold.objects.get(pk=share.pk).state == EarningsHold.State.FROZEN


def test_why_an_order_cannot_be_disputed_names_the_order_and_the_reason(
    funded_buyer, listing, node
):
    order = settled_order(funded_buyer, listing, node)
    share = order.earnings_hold
    now = timezone.now()
    order.state = Order.State.RUNNING
    assert payments.why_not_disputable(order, share, now) == (
        f"order {order.pk} is running: only a settled order"
    )
    order.state = Order.State.FAILED  # a failed order that ran was charged: disputable
    assert payments.why_not_disputable(order, share, now) is None
    assert payments.why_not_disputable(order, None, now) == (
        f"order {order.pk} was not charged: there is nothing to dispute"
    )
    for state in (Order.State.DISPUTED, Order.State.RESOLVED):
        order.state = state
        assert payments.why_not_disputable(order, share, now) == (
            f"order {order.pk} was already disputed"
        )
    order.state = Order.State.COMPLETED
    share.state = EarningsHold.State.RELEASED  # released early by an operator: no longer frozen
    assert "closed at" in payments.why_not_disputable(order, share, now)


def test_a_stranger_disputing_a_settled_order_is_told_it_is_unknown(
    funded_buyer, stranger, listing, node
):
    order = settled_order(funded_buyer, listing, node)
    with pytest.raises(MarketError) as refused:
        payments.open_dispute(order, stranger, "not mine")
    assert refused.value.field == "order"
    assert str(refused.value) == f"unknown order {order.pk}"
    assert not Dispute.objects.exists()


@pytest.fixture
def disputed(funded_buyer, listing, node):
    order = settled_order(funded_buyer, listing, node)
    return payments.open_dispute(order, funded_buyer, "slow")


@pytest.mark.parametrize("refund", [True, -1, 1.0, "5", None])
def test_a_refund_that_is_not_a_whole_amount_from_0_is_refused(disputed, make_user, refund):
    before = balances()
    with pytest.raises(MarketError) as refused:
        payments.resolve_dispute(disputed, refund=refund, operator=make_user("olga"))
    assert refused.value.field == "refund"
    assert str(refused.value) == (
        "refund must be a whole number of millionths of a dollar, 0 or more"
    )
    assert balances() == before
    assert Dispute.objects.get(pk=disputed.pk).state == "open"


def test_a_refund_of_nothing_gives_the_whole_share_to_the_provider(disputed, provider, make_user):
    s = Order.objects.get(pk=disputed.order_id).settlement
    olga = make_user("olga", is_staff=True)
    at = timezone.now()
    with mock.patch("django.utils.timezone.now", return_value=at):
        resolved = payments.resolve_dispute(disputed, refund=0, operator=olga, note="fine")
    assert (resolved.state, resolved.refund) == ("resolved", 0)
    assert resolved.resolved_by == olga and resolved.resolved_at == at
    assert resolved.resolution.memo == f"dispute of order {disputed.order_id}: $0.00 refunded"
    share = EarningsHold.objects.get(order_id=disputed.order_id)
    # The same once_key as a release: a share is resolved once, either way, whatever the locks.
    assert resolved.resolution.once_key == f"earnings:{share.pk}"
    share = EarningsHold.objects.get(order_id=disputed.order_id)
    assert (share.state, share.resolved_at, share.resolution) == (
        EarningsHold.State.RESOLVED,
        at,
        resolved.resolution,
    )
    assert ledger.earnings_for(provider) == s.provider_amount
    assert ledger.frozen_for(provider) == 0
    assert ledger.fees_account().balance == s.fee
    transition = Order.objects.get(pk=disputed.order_id).transitions.last()
    assert transition.reason == "dispute resolved by olga: $0.00 refunded"
    assert audit_ledger() == []


def test_a_refund_of_exactly_the_share_leaves_the_fee_and_the_provider_nothing(
    disputed, funded_buyer, provider, make_user
):
    s = Order.objects.get(pk=disputed.order_id).settlement
    wallet = ledger.available_for(funded_buyer)
    resolved = payments.resolve_dispute(
        disputed, refund=s.provider_amount, operator=make_user("olga")
    )
    assert resolved.resolution_note == ""  # no note given, none recorded
    assert ledger.available_for(funded_buyer) == wallet + s.provider_amount
    assert ledger.earnings_for(provider) == 0
    assert ledger.fees_account().balance == s.fee
    assert audit_ledger() == []


def test_a_refund_of_everything_captured_is_allowed_and_one_more_is_not(
    disputed, funded_buyer, make_user
):
    s = Order.objects.get(pk=disputed.order_id).settlement
    olga = make_user("olga")
    with pytest.raises(MarketError) as refused:
        payments.resolve_dispute(disputed, refund=s.captured + 1, operator=olga)
    assert refused.value.field == "refund"
    assert str(refused.value) == (
        f"refund {format_usd(s.captured + 1, exact=True)} is more than the "
        f"{format_usd(s.captured, exact=True)} captured"
    )
    wallet = ledger.available_for(funded_buyer)
    payments.resolve_dispute(disputed, refund=s.captured, operator=olga)
    assert ledger.available_for(funded_buyer) == wallet + s.captured


def test_a_refund_over_the_capture_is_refused_with_both_amounts_to_the_millionth(
    funded_buyer, listing, node, make_user
):
    # Seven minutes at 2 USD an hour is not a whole number of cents: rounded, the refusal of a
    # refund one millionth too big would show the operator two equal amounts.
    order = settled_order(funded_buyer, listing, node, minutes=7)
    captured = order.settlement.captured
    assert captured % 10_000 != 0
    dispute = payments.open_dispute(order, funded_buyer, "slow")
    before = balances()
    with pytest.raises(MarketError) as refused:
        payments.resolve_dispute(dispute, refund=captured + 1, operator=make_user("olga"))
    assert str(refused.value) == (
        f"refund {format_usd(captured + 1, exact=True)} is more than the "
        f"{format_usd(captured, exact=True)} captured"
    )
    assert format_usd(captured, exact=True) != format_usd(captured)
    assert balances() == before


def test_a_resolution_note_is_kept_to_its_500_characters(disputed, make_user):
    resolved = payments.resolve_dispute(
        disputed, refund=1, operator=make_user("olga"), note="n" * 499 + "END" + "z" * 100
    )
    assert resolved.resolution_note == "n" * 499 + "E"


def test_a_second_resolution_says_which_order(disputed, make_user):
    olga = make_user("olga")
    payments.resolve_dispute(disputed, refund=1, operator=olga)
    with pytest.raises(AlreadyResolved) as refused:
        payments.resolve_dispute(disputed, refund=1, operator=olga)
    assert str(refused.value) == f"the dispute of order {disputed.order_id} was already resolved"


def test_a_dispute_and_its_resolution_move_only_their_own_order(
    funded_buyer, provider, listing, node, make_user
):
    # Each order's share is its own money: disputing or resolving one order must leave the
    # buyer's other orders' shares and disputes as they were (frozen, or still open).
    first = settled_order(funded_buyer, listing, node)
    second = settled_order(funded_buyer, listing, node)
    third = settled_order(funded_buyer, listing, node)
    dispute = payments.open_dispute(first, funded_buyer, "slow")
    assert EarningsHold.objects.get(order=second).state == EarningsHold.State.FROZEN
    other = payments.open_dispute(second, funded_buyer, "broken")

    olga = make_user("olga")
    payments.resolve_dispute(dispute, refund=0, operator=olga)
    assert EarningsHold.objects.get(order=second).state == EarningsHold.State.DISPUTED
    assert EarningsHold.objects.get(order=third).state == EarningsHold.State.FROZEN
    still = Dispute.objects.get(pk=other.pk)
    assert (still.state, still.refund, still.resolution) == ("open", None, None)

    resolved = payments.resolve_dispute(other, refund=1, operator=olga)
    assert (resolved.state, resolved.refund) == ("resolved", 1)
    share = EarningsHold.objects.get(order=second)
    assert (share.state, share.resolution) == (EarningsHold.State.RESOLVED, resolved.resolution)
    assert ledger.frozen_for(provider) == third.settlement.provider_amount
    assert audit_ledger() == []


def test_a_resolution_of_an_order_no_longer_disputed_moves_nothing_and_says_which(
    disputed, make_user
):
    # Only resolve_dispute moves an order out of `disputed`, in the transaction that closes its
    # dispute; an open dispute whose order says otherwise (a row edited by hand) must not be
    # paid out: the refund and the release posted before the order's transition roll back.
    Order.objects.filter(pk=disputed.order_id).update(state=Order.State.COMPLETED)
    before = balances()
    with pytest.raises(InvalidTransition) as refused:
        payments.resolve_dispute(disputed, refund=1, operator=make_user("olga"))
    assert str(refused.value) == f"order {disputed.order_id} is no longer disputed"
    assert balances() == before
    assert Dispute.objects.get(pk=disputed.pk).state == "open"
    assert EarningsHold.objects.get(order_id=disputed.order_id).state == (
        EarningsHold.State.DISPUTED
    )
    assert not LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.DISPUTE).exists()


# --- payouts -------------------------------------------------------------------------------------


def test_a_payout_request_and_its_payment_are_on_the_ledger_with_who_and_what(
    earning_provider, make_user
):
    payout = payments.request_payout(earning_provider, 700)
    assert (
        payout.request_transaction.memo == f"payout requested by {earning_provider.get_username()}"
    )
    assert ledger.payouts_pending_for(earning_provider) == 700
    olga = make_user("olga", is_staff=True)
    at = timezone.now()
    with mock.patch("django.utils.timezone.now", return_value=at):
        paid = payments.mark_payout_paid(payout, operator=olga, reference="r" * 250)
    assert paid.note == "r" * 200
    assert (paid.decided_by, paid.decided_at) == (olga, at)
    assert paid.resolution.memo == (f"payout {payout.pk} paid: " + "r" * 250)[:200]
    assert paid.resolution.once_key == f"payout:{payout.pk}"  # paid or rejected once, by the DB
    assert ledger.payouts_pending_for(earning_provider) == 0


def test_a_payout_paid_without_a_reference_records_none(earning_provider, make_user):
    payout = payments.request_payout(earning_provider, 700)
    paid = payments.mark_payout_paid(payout, operator=make_user("olga"))
    assert paid.state == "paid" and paid.note == ""
    assert paid.resolution.memo == f"payout {payout.pk} paid: "


def test_a_rejected_payout_says_why_on_the_ledger_and_the_record(earning_provider, make_user):
    earned = ledger.earnings_for(earning_provider)
    payout = payments.request_payout(earning_provider, 700)
    olga = make_user("olga", is_staff=True)
    rejected = payments.reject_payout(payout, operator=olga, reason="  no IBAN  ")
    assert (rejected.note, rejected.decided_by) == ("no IBAN", olga)  # who said no, and why
    assert rejected.resolution.kind == LedgerTransaction.Kind.PAYOUT_REJECTED
    assert rejected.resolution.memo == f"payout {payout.pk} rejected: no IBAN"
    assert rejected.resolution.once_key == f"payout:{payout.pk}"
    assert ledger.earnings_for(earning_provider) == earned
    with pytest.raises(AlreadyResolved) as again:
        payments.mark_payout_paid(payout, operator=make_user("oscar"))
    assert str(again.value) == f"payout {payout.pk} was already rejected"


@pytest.mark.parametrize("reason", ["", "  ", None])
def test_a_payout_is_not_rejected_without_a_reason(earning_provider, make_user, reason):
    payout = payments.request_payout(earning_provider, 700)
    with pytest.raises(MarketError) as refused:
        payments.reject_payout(payout, operator=make_user("olga"), reason=reason)
    assert refused.value.field == "reason"
    assert str(refused.value) == "say why the payout is rejected"
    assert PayoutRequest.objects.get(pk=payout.pk).state == "requested"


# --- receipts ------------------------------------------------------------------------------------


def test_a_receipt_says_when_and_in_what_state_the_order_was_settled(funded_buyer, listing, node):
    order = settled_order(funded_buyer, listing, node)
    receipt = payments.receipt_for(order)
    assert (receipt["order"], receipt["state"]) == (order.pk, "completed")
    assert receipt["settled_at"] == order.settlement.created_at
    assert receipt["hold"] == order.hold_amount
    assert (receipt["platform_fee"], receipt["provider_share"], receipt["released"]) == (
        order.settlement.fee,
        order.settlement.provider_amount,
        order.settlement.released,
    )


def test_an_uncharged_receipt_names_the_order_and_when_it_ended(funded_buyer, listing):
    from marketplace.orders import stop_order

    order = placed_order(funded_buyer, listing)
    stop_order(order)
    order = Order.objects.get(pk=order.pk)
    receipt = payments.receipt_for(order)
    assert receipt == {
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
    assert order.ended_at is not None


def test_a_receipt_of_an_open_dispute_shows_nothing_refunded_yet(disputed):
    receipt = payments.receipt_for(Order.objects.get(pk=disputed.order_id))
    assert receipt["state"] == "disputed"
    assert receipt["refunded"] == 0 and receipt["net_paid"] == receipt["captured"]


def test_a_live_order_has_no_receipt(funded_buyer, listing):
    from marketplace.errors import InvalidTransition

    order = placed_order(funded_buyer, listing)
    with pytest.raises(InvalidTransition, match=f"order {order.pk} is "):
        payments.receipt_for(order)
