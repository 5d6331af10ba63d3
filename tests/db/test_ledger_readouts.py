"""What the ledger reads out per user (wallet, held, earnings, frozen, pending payouts) and the
refusals of a reversal, pinned down field by field: the mutation run (`make mutate MODULES=ledger`)
found each of these read only for a lone user, or by its effect, in tests/db/test_ledger.py."""

from __future__ import annotations

import pytest

from marketplace import ledger
from marketplace.errors import AlreadyResolved, InsufficientFunds, MarketError
from marketplace.models import Account, LedgerTransaction
from marketplace.orders import place_order
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def fund(account: Account, amount: int) -> None:
    ledger.post("grant", [(ledger.world_account(), -amount), (account, amount)])


def test_each_users_wallet_and_held_amount_are_their_own(buyer, stranger, listing):
    ledger.grant_credits(buyer, 100 * USD)
    ledger.grant_credits(stranger, 50 * USD)
    mine = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    theirs = place_order(
        stranger,
        listing_id=listing.pk,
        gpu_count=2,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    assert mine.hold.amount != theirs.hold.amount  # so a sum of both tells itself apart
    assert ledger.held_for(buyer) == mine.hold.amount
    assert ledger.held_for(stranger) == theirs.hold.amount
    assert ledger.available_for(buyer) == 100 * USD - mine.hold.amount
    assert ledger.available_for(stranger) == 50 * USD - theirs.hold.amount


def test_the_available_amount_is_the_wallets_even_when_another_account_came_first(provider):
    # The provider's earnings account exists before their wallet: the wallet is not simply the
    # user's first account.
    fund(ledger.earnings_account(provider), 500)
    ledger.grant_credits(provider, 3)
    assert ledger.available_for(provider) == 3
    assert ledger.earnings_for(provider) == 500


def test_earnings_frozen_shares_and_pending_payouts_are_each_providers_own(provider, stranger):
    # The other provider's accounts come first, so a query that forgot the user finds theirs.
    fund(ledger.earnings_account(stranger), 7)
    fund(Account.objects.create(kind=Account.Kind.FROZEN, user=stranger), 11)
    fund(Account.objects.create(kind=Account.Kind.PAYOUT, user=stranger), 13)
    fund(ledger.earnings_account(provider), 500)
    fund(Account.objects.create(kind=Account.Kind.FROZEN, user=provider), 20)
    fund(Account.objects.create(kind=Account.Kind.FROZEN, user=provider), 30)
    fund(Account.objects.create(kind=Account.Kind.PAYOUT, user=provider), 40)
    assert ledger.earnings_for(provider) == 500
    assert ledger.frozen_for(provider) == 50  # both of the provider's frozen shares
    assert ledger.payouts_pending_for(provider) == 40
    assert (ledger.earnings_for(stranger), ledger.frozen_for(stranger)) == (7, 11)
    assert ledger.payouts_pending_for(stranger) == 13


def test_a_reversal_names_the_transaction_it_corrects_and_why_in_its_memo(buyer):
    grant = ledger.grant_credits(buyer, 7 * USD)
    reversal = ledger.reverse_transaction(grant, "  wrong amount  ")
    assert reversal.memo == f"reversal of #{grant.pk}: wrong amount"


def test_a_reversal_without_a_reason_is_refused_naming_the_memo(buyer):
    grant = ledger.grant_credits(buyer, 7 * USD)
    with pytest.raises(MarketError) as refused:
        ledger.reverse_transaction(grant, "  ")
    assert refused.value.field == "memo"
    assert str(refused.value) == "say why the transaction is reversed"
    assert not LedgerTransaction.objects.filter(kind="reversal").exists()


def test_reversing_a_kind_with_its_own_record_is_refused_naming_the_transaction(buyer):
    ledger.grant_credits(buyer, 7 * USD)
    escrow = Account.objects.create(kind=Account.Kind.ESCROW, user=buyer)
    hold = ledger.post("hold", [(ledger.wallet_account(buyer), -USD), (escrow, USD)])
    with pytest.raises(MarketError) as refused:
        ledger.reverse_transaction(hold, "undo")
    assert refused.value.field == "transaction"
    assert str(refused.value) == (
        "a hold transaction is corrected through its own record, not reversed"
    )
    assert not LedgerTransaction.objects.filter(kind="reversal").exists()


def test_a_resolution_keeps_the_memo_it_was_given(buyer, provider, listing):
    ledger.grant_credits(buyer, 100 * USD)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    txn = ledger.resolve_hold(order.hold, captured=USD, fee=0, provider=provider, memo="why")
    assert LedgerTransaction.objects.get(pk=txn.pk).memo == "why"


def test_a_long_memo_is_kept_to_its_first_200_characters(buyer):
    # The column holds 200; SQLite would store more, so the cut is the code's, and checked here.
    txn = ledger.grant_credits(buyer, 1, memo="x" * 199 + "yz")
    assert LedgerTransaction.objects.get(pk=txn.pk).memo == "x" * 199 + "y"


@pytest.mark.parametrize("amount", [0, -1])
def test_a_grant_of_nothing_is_refused_saying_it_must_be_positive(buyer, amount):
    with pytest.raises(ValueError) as refused:
        ledger.grant_credits(buyer, amount)
    assert str(refused.value) == "amount must be positive"


def test_the_smallest_grant_is_one_micro_usd(buyer):
    ledger.grant_credits(buyer, 1)
    assert ledger.available_for(buyer) == 1


def test_a_holds_posting_names_its_order(buyer, listing):
    ledger.grant_credits(buyer, 100 * USD)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    assert LedgerTransaction.objects.get(kind="hold").memo == f"hold for order {order.pk}"


def test_legs_on_one_account_are_merged_into_one_entry(buyer):
    wallet = ledger.wallet_account(buyer)
    txn = ledger.post("grant", [(ledger.world_account(), -10), (wallet, 4), (wallet, 6)])
    assert [(e.account_id, e.amount) for e in txn.entries.filter(account=wallet)] == [
        (wallet.pk, 10)
    ]
    assert ledger.available_for(buyer) == 10


def test_a_posting_without_a_memo_has_an_empty_one(buyer):
    txn = ledger.post("grant", [(ledger.world_account(), -1), (ledger.wallet_account(buyer), 1)])
    assert LedgerTransaction.objects.get(pk=txn.pk).memo == ""


def test_a_second_posting_resolving_one_hold_is_refused_saying_so(buyer, provider, listing):
    ledger.grant_credits(buyer, 100 * USD)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=factories.wg_public_key(),
    )
    ledger.resolve_hold(order.hold, captured=0, fee=0, provider=provider, memo="released")
    # Past resolve_hold's state check, straight at the unique column: the refusal names the hold.
    with pytest.raises(AlreadyResolved) as refused:
        ledger.post("release", [], resolves_hold=order.hold)
    assert str(refused.value) == "this hold was already resolved"


def test_a_debit_past_zero_is_refused_naming_the_account_and_the_amount(buyer, stranger):
    ledger.grant_credits(buyer, 3)
    with pytest.raises(InsufficientFunds) as refused:
        ledger.post(
            "hold", [(ledger.wallet_account(buyer), -5), (ledger.wallet_account(stranger), 5)]
        )
    assert str(refused.value) == "insufficient funds: wallet account cannot cover $0.000005"
