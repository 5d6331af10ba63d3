"""The double-entry ledger: grants, two-phase escrow holds, append-only entries, and the audit
that recomputes every invariant of money.md from the rows."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command, execute_from_command_line
from django.db import DatabaseError, connection, transaction

from marketplace import ledger
from marketplace.audit import audit_ledger
from marketplace.errors import AlreadyResolved, InsufficientFunds, MarketError
from marketplace.models import Account, EscrowHold, LedgerEntry, LedgerTransaction
from marketplace.orders import place_order, provision_order, stop_order
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]


@pytest.fixture
def order(buyer, listing):
    """A placed order of one GPU for one hour: its hold is 2 USD + the bandwidth allowance."""
    ledger.grant_credits(buyer, 100 * USD)
    return place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )


def balances() -> dict[tuple[str, int | None], int]:
    return {(a.kind, a.user_id): a.balance for a in Account.objects.exclude(kind="escrow")}


def ledger_rows() -> tuple[int, int, int, int]:
    return (
        LedgerTransaction.objects.count(),
        LedgerEntry.objects.count(),
        Account.objects.count(),
        EscrowHold.objects.count(),
    )


def test_a_grant_moves_credits_from_the_outside_world_into_the_wallet(buyer):
    txn = ledger.grant_credits(buyer, 25 * USD)
    assert txn.kind == LedgerTransaction.Kind.GRANT
    legs = sorted((e.account.kind, e.amount) for e in txn.entries.select_related("account"))
    assert legs == [("wallet", 25 * USD), ("world", -25 * USD)]
    assert ledger.available_for(buyer) == 25 * USD
    assert ledger.world_account().balance == -25 * USD
    assert audit_ledger() == []


@pytest.mark.parametrize("amount", [0, -5])
def test_a_grant_must_be_positive(buyer, amount):
    with pytest.raises(ValueError, match="positive"):
        ledger.grant_credits(buyer, amount)
    assert ledger_rows()[:2] == (0, 0)


def test_an_unbalanced_posting_is_refused_before_anything_is_written(buyer):
    wallet = ledger.wallet_account(buyer)
    with pytest.raises(ValueError, match="does not balance"):
        ledger.post("grant", [(ledger.world_account(), -10), (wallet, 9)])
    assert ledger_rows()[:2] == (0, 0)


def test_placing_an_order_holds_its_amount_in_escrow(buyer, order):
    hold = order.hold
    assert hold.state == EscrowHold.State.OPEN
    assert hold.amount == order.hold_amount > 0
    escrow = Account.objects.get(pk=hold.account_id)
    assert escrow.kind == Account.Kind.ESCROW and escrow.balance == hold.amount
    assert ledger.available_for(buyer) == 100 * USD - hold.amount
    assert ledger.held_for(buyer) == hold.amount
    assert audit_ledger() == []


def test_capture_pays_provider_less_fee_and_returns_the_rest(buyer, provider, order):
    hold = order.hold
    txn = ledger.resolve_hold(hold, captured=1_500_000, fee=150_000, provider=provider, memo="t")
    hold.refresh_from_db()
    assert txn.kind == LedgerTransaction.Kind.CAPTURE
    assert txn.resolves_hold_id == hold.pk
    assert hold.state == EscrowHold.State.CAPTURED and hold.resolved_at is not None
    assert Account.objects.get(pk=hold.account_id).balance == 0
    assert ledger.available_for(buyer) == 100 * USD - 1_500_000
    assert ledger.earnings_account(provider).balance == 1_350_000
    assert ledger.fees_account().balance == 150_000
    assert ledger.held_for(buyer) == 0
    assert audit_ledger() == []


def test_release_returns_the_whole_hold(buyer, provider, order):
    txn = ledger.resolve_hold(order.hold, captured=0, fee=0, provider=None, memo="cancel")
    assert txn.kind == LedgerTransaction.Kind.RELEASE
    assert EscrowHold.objects.get(pk=order.hold.pk).state == EscrowHold.State.RELEASED
    assert ledger.available_for(buyer) == 100 * USD
    assert ledger.earnings_account(provider).balance == 0
    assert audit_ledger() == []


@pytest.mark.parametrize("first", ["capture", "release"])
@pytest.mark.parametrize("second", ["capture", "release"])
def test_a_second_resolution_is_refused_and_moves_nothing(provider, order, first, second):
    def resolve(how):
        captured = 1_000_000 if how == "capture" else 0
        return ledger.resolve_hold(
            order.hold, captured=captured, fee=captured // 10, provider=provider, memo=how
        )

    resolve(first)
    before = (ledger_rows(), balances())
    with pytest.raises(AlreadyResolved):
        resolve(second)
    assert (ledger_rows(), balances()) == before
    assert audit_ledger() == []


def test_a_hold_is_captured_at_most_once_and_a_second_capture_moves_no_money(
    buyer, provider, order
):
    # A settlement retried (a redelivered task, the sweep) holds the hold as it read it
    # before the first capture: open. The capture must still happen once.
    stale = order.hold
    ledger.resolve_hold(stale, captured=1_500_000, fee=150_000, provider=provider, memo="one")
    hold = EscrowHold.objects.get(pk=stale.pk)
    assert hold.state == EscrowHold.State.CAPTURED
    assert ledger.held_for(buyer) == 0  # nothing still counted as held for the buyer
    before = (ledger_rows(), balances())

    for captured, fee in [(1_500_000, 150_000), (hold.amount, 0), (0, 0)]:
        with pytest.raises(AlreadyResolved, match=f"order {order.pk} was already captured"):
            ledger.resolve_hold(stale, captured=captured, fee=fee, provider=provider, memo="two")

    assert (ledger_rows(), balances()) == before
    assert LedgerTransaction.objects.filter(resolves_hold=hold).count() == 1
    assert EscrowHold.objects.get(pk=hold.pk).state == EscrowHold.State.CAPTURED
    assert sum(LedgerEntry.objects.values_list("amount", flat=True)) == 0
    assert ledger.available_for(buyer) == 100 * USD - 1_500_000
    assert ledger.earnings_account(provider).balance == 1_350_000
    assert audit_ledger() == []


def test_the_unique_resolution_refuses_a_second_one_even_past_the_state_check(provider, order):
    """resolve_hold checks the hold's state under a row lock; the unique resolves_hold column
    is the guarantee underneath. Posting a second resolution directly hits that constraint."""
    hold = order.hold
    ledger.resolve_hold(hold, captured=0, fee=0, provider=None, memo="first")
    before = (ledger_rows(), balances())
    wallet = ledger.wallet_account(order.buyer)
    with pytest.raises(AlreadyResolved):
        ledger.post("release", [(wallet, -1), (ledger.world_account(), 1)], resolves_hold=hold)
    assert (ledger_rows(), balances()) == before


@pytest.mark.parametrize(("captured", "fee"), [(-1, 0), (10**12, 0), (100, 101), (100, -1)])
def test_impossible_capture_amounts_are_refused(provider, order, captured, fee):
    with pytest.raises(ValueError, match="cannot capture"):
        ledger.resolve_hold(order.hold, captured=captured, fee=fee, provider=provider, memo="x")
    assert EscrowHold.objects.get(pk=order.hold.pk).state == EscrowHold.State.OPEN


def test_insufficient_funds_for_a_hold_writes_nothing(buyer, listing):
    ledger.grant_credits(buyer, 1 * USD)
    before = (ledger_rows(), balances())
    with pytest.raises(InsufficientFunds):
        place_order(
            buyer,
            listing_id=listing.pk,
            gpu_count=1,
            hours=1,
            wireguard_public_key=factories.wg_public_key(),
        )
    assert (ledger_rows(), balances()) == before
    assert buyer.orders.count() == 0
    assert audit_ledger() == []


def test_a_debit_past_zero_is_refused_and_the_whole_posting_rolls_back(buyer, stranger):
    # The stranger's wallet is older, so its credit leg is applied first (legs go in primary
    # key order) and must be undone when the buyer's debit fails its guard.
    stranger_wallet = ledger.wallet_account(stranger)
    ledger.grant_credits(buyer, 5)
    before = (ledger_rows(), balances())
    with pytest.raises(InsufficientFunds):
        ledger.post("grant", [(ledger.wallet_account(buyer), -6), (stranger_wallet, 6)])
    assert (ledger_rows(), balances()) == before
    assert Account.objects.get(pk=stranger_wallet.pk).balance == 0
    assert ledger.available_for(buyer) == 5


def _refused(run) -> str:
    """Run `run` in its own savepoint (so the test's transaction stays usable) and return the
    database's refusal."""
    with pytest.raises(DatabaseError) as err, transaction.atomic():
        run()
    return str(err.value)


def test_ledger_entries_cannot_be_updated_or_deleted(buyer):
    ledger.grant_credits(buyer, 10)
    entries = LedgerEntry.objects.all()
    assert "append-only" in _refused(lambda: entries.update(amount=1_000_000))
    assert "append-only" in _refused(lambda: entries.delete())
    assert sorted(LedgerEntry.objects.values_list("amount", flat=True)) == [-10, 10]


def test_ledger_transactions_cannot_be_updated_or_deleted(buyer):
    txn = ledger.grant_credits(buyer, 10)
    rows = LedgerTransaction.objects.filter(pk=txn.pk)
    assert "append-only" in _refused(lambda: rows.update(memo="rewritten"))

    def raw_delete():
        # The ORM refuses first (entries PROTECT their transaction); raw SQL reaches the trigger.
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM marketplace_ledgertransaction WHERE id = %s", [txn.pk])

    assert "append-only" in _refused(raw_delete)
    assert LedgerTransaction.objects.get(pk=txn.pk).memo == "operator grant"


def test_the_audit_finds_a_balance_that_disagrees_with_its_entries(buyer):
    ledger.grant_credits(buyer, 10 * USD)
    assert audit_ledger() == []
    # Account balances are a cache, not part of the append-only ledger: a raw write can
    # corrupt one, and the audit must notice.
    Account.objects.filter(kind="wallet", user=buyer).update(balance=11 * USD)
    violations = audit_ledger()
    assert len(violations) == 1
    assert "balance 11000000 != sum of its entries 10000000" in violations[0]


def test_the_audit_finds_an_unbalanced_transaction_and_a_ledger_that_does_not_sum_to_zero(buyer):
    ledger.grant_credits(buyer, 10)
    wallet = ledger.wallet_account(buyer)
    # A one-legged "transaction", the kind of bug post() exists to prevent, written by hand.
    bad = LedgerTransaction.objects.create(kind="grant", memo="planted")
    LedgerEntry.objects.create(transaction=bad, account=wallet, amount=7)
    Account.objects.filter(pk=wallet.pk).update(balance=17)
    violations = audit_ledger()
    assert any("whole ledger sum to 7" in v for v in violations)
    assert any(f"transaction #{bad.pk} entries sum to 7" in v for v in violations)


def test_the_audit_finds_a_hold_whose_escrow_was_emptied_without_a_resolution(order):
    # Money leaves escrow by a posting that is not the hold's resolution: the hold is still
    # open but its escrow no longer covers it.
    escrow = order.hold.account
    ledger.post("reversal", [(escrow, -1000), (ledger.wallet_account(order.buyer), 1000)])
    violations = audit_ledger()
    assert any(f"hold #{order.hold.pk}" in v and "escrow holds" in v for v in violations)
    assert any("open holds total" in v for v in violations)


def test_the_audit_finds_an_ended_order_whose_hold_is_still_open(order):
    type(order).objects.filter(pk=order.pk).update(state="cancelled")
    assert audit_ledger() == [f"order {order.pk} is cancelled but its hold is still open"]


def test_audit_command_reports_ok_with_counts(buyer, capsys):
    ledger.grant_credits(buyer, 10)
    ledger.grant_credits(buyer, 20)
    call_command("audit_ledger")
    assert capsys.readouterr().out.strip() == "ledger audit: OK (2 transactions, 4 entries)"


def test_audit_command_prints_violations_and_exits_non_zero(buyer, capsys):
    ledger.grant_credits(buyer, 10)
    Account.objects.filter(kind="wallet", user=buyer).update(balance=999)
    with pytest.raises(SystemExit) as exit_:
        execute_from_command_line(["manage.py", "audit_ledger"])
    assert exit_.value.code == 1
    out = capsys.readouterr()
    assert "VIOLATION:" in out.out and "balance 999 != sum of its entries 10" in out.out
    assert "1 violation" in out.err


# --- corrections are reversing transactions ----------------------------------------------------


def test_a_grant_is_corrected_by_a_reversal_that_negates_every_entry(buyer):
    grant = ledger.grant_credits(buyer, 7 * USD, memo="typo: meant 7 cents")
    reversal = ledger.reverse_transaction(grant, "wrong amount")
    assert reversal.kind == LedgerTransaction.Kind.REVERSAL
    assert reversal.reverses_id == grant.pk
    legs = sorted((e.account.kind, e.amount) for e in reversal.entries.select_related("account"))
    assert legs == [("wallet", -7 * USD), ("world", 7 * USD)]
    assert ledger.available_for(buyer) == 0
    assert ledger.world_account().balance == 0
    # The original stays, untouched: the books show the mistake and its correction.
    assert LedgerEntry.objects.filter(transaction=grant).count() == 2
    assert audit_ledger() == []


def test_a_transaction_is_reversed_at_most_once(buyer):
    grant = ledger.grant_credits(buyer, 5 * USD)
    ledger.reverse_transaction(grant, "first")
    ledger.grant_credits(buyer, 5 * USD)  # so the wallet could cover a second reversal
    before = (ledger_rows(), balances())
    with pytest.raises(AlreadyResolved, match="already reversed"):
        ledger.reverse_transaction(grant, "again")
    assert (ledger_rows(), balances()) == before


def test_reversing_credits_already_spent_is_refused_and_moves_nothing(buyer, order):
    grant = LedgerTransaction.objects.get(kind="grant")  # the 100 USD the order's hold used
    before = (ledger_rows(), balances())
    with pytest.raises(InsufficientFunds):
        ledger.reverse_transaction(grant, "chargeback")
    assert (ledger_rows(), balances()) == before


def test_records_with_their_own_resolution_are_not_reversed_directly(order):
    hold_txn = LedgerTransaction.objects.get(kind="hold")
    with pytest.raises(MarketError, match="corrected through its own record"):
        ledger.reverse_transaction(hold_txn, "undo")
    with pytest.raises(MarketError, match="why"):
        ledger.reverse_transaction(LedgerTransaction.objects.get(kind="grant"), "  ")
    assert not LedgerTransaction.objects.filter(kind="reversal").exists()


def test_the_audit_finds_a_reversal_that_is_not_the_exact_opposite(buyer):
    grant = ledger.grant_credits(buyer, 10)
    wallet, world = ledger.wallet_account(buyer), ledger.world_account()
    ledger.post("reversal", [(wallet, -4), (world, 4)], reverses=grant)  # reverses only part
    ledger.post("reversal", [(wallet, -1), (world, 1)])  # names nothing
    violations = audit_ledger()
    assert any(f"is not the exact opposite of #{grant.pk}" in v for v in violations)
    assert any("does not name the transaction it reverses" in v for v in violations)


# --- frozen shares and payouts in the audit --------------------------------------------------


def settle(buyer, order):
    from datetime import timedelta

    from django.utils import timezone

    from meshnet.agent_channel import acknowledge_revision

    provision_order(order.pk)
    node = order.listing.node
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=timezone.now() - timedelta(minutes=30))
    stop_order(type(order).objects.get(pk=order.pk))
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision)
    return type(order).objects.select_related("earnings_hold").get(pk=order.pk)


def test_the_audit_finds_a_frozen_share_moved_without_its_resolution(buyer, provider, order):
    settled = settle(buyer, order)
    share = settled.earnings_hold
    assert audit_ledger() == []
    ledger.post("reversal", [(share.account, -100), (ledger.earnings_account(provider), 100)])
    violations = audit_ledger()
    assert any(f"frozen share #{share.pk}" in v and "its account holds" in v for v in violations)


def test_the_audit_finds_a_payout_account_that_disagrees_with_its_request(provider):
    from marketplace import payments

    ledger.post("grant", [(ledger.world_account(), -500), (ledger.earnings_account(provider), 500)])
    payout = payments.request_payout(provider, 300)
    assert audit_ledger() == []
    ledger.post("reversal", [(payout.account, -1), (ledger.earnings_account(provider), 1)])
    assert any(f"payout #{payout.pk} is requested for 300" in v for v in audit_ledger())


def test_the_audit_finds_a_completed_order_whose_share_was_never_frozen(buyer, order):
    settled = settle(buyer, order)
    EarningsHold = type(settled.earnings_hold)
    # Sneak the share out of existence the way only a bug could: drop its row.
    EarningsHold.objects.filter(pk=settled.earnings_hold.pk).delete()
    violations = audit_ledger()
    assert any("captured money but froze no share" in v for v in violations)
    assert any("belongs to no share" in v for v in violations)


# --- the audit's result is kept for the ops dashboard -----------------------------------------


def test_each_audit_command_run_is_recorded(buyer, capsys):
    from marketplace.models import AuditRun

    ledger.grant_credits(buyer, 10)
    call_command("audit_ledger")
    run = AuditRun.objects.latest()
    assert (run.ok, run.violation_count, run.violations, run.source) == (True, 0, "", "command")
    assert (run.transaction_count, run.entry_count) == (1, 2)

    Account.objects.filter(kind="wallet", user=buyer).update(balance=999)
    with pytest.raises(CommandError):
        call_command("audit_ledger")
    failed = AuditRun.objects.latest()
    assert failed.pk != run.pk
    assert (failed.ok, failed.violation_count) == (False, 1)
    assert "balance 999 != sum of its entries 10" in failed.violations


def test_the_hourly_beat_task_records_an_audit_run(buyer):
    from marketplace import tasks
    from marketplace.models import AuditRun

    assert tasks.audit_ledger() is True
    assert AuditRun.objects.get().source == "beat"
