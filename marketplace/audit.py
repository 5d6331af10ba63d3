"""The ledger audit: every invariant of money.md, recomputed from the rows.

`audit_ledger()` only reads. It returns one line per violation (an empty list means the books
balance), so tests can call it after every step and the `audit_ledger` management command can
print it. Each check is one aggregate query (or one pass over the holds), never a query per
account, so it stays usable on a ledger of real size.

What it checks:
- the sum of all entries is zero, and each transaction's entries sum to zero;
- each Account.balance (a cache the postings maintain) equals the sum of its entries;
- no account but the outside world is below zero;
- every hold is resolved at most once, and its state agrees with its resolution;
- an open hold's escrow account holds exactly the hold's amount (so the open holds sum to the
  escrow balance), a resolved hold's escrow account is at zero, and no escrow account lacks a
  hold;
- every order has a hold; every ended order's hold is resolved; a completed (or disputed, or
  resolved) order has a settlement, and a settlement belongs to an ended order, is its hold's
  resolution and splits the hold exactly (captured + released == hold, fee + provider ==
  captured);
- every settlement that captured money froze exactly the provider's share in an EarningsHold;
  a frozen or disputed share's account holds exactly its amount, a released or resolved one's
  holds nothing and was resolved by the matching transaction; no frozen account lacks a share;
- disputes agree with their orders and shares, and a refund never exceeds what was captured;
- a payout request's account holds its amount until it is paid or rejected, then nothing;
- every reversal names the transaction it reverses and is its exact negation.

`record_audit_run()` runs the audit and stores the result as an AuditRun (the ops dashboard
shows the latest); `manage.py audit_ledger` and the hourly beat task call it.
"""

from __future__ import annotations

import time
from collections import defaultdict

from django.db.models import Count, F, Q, Sum, Value
from django.db.models.functions import Coalesce

from marketplace.models import (
    Account,
    AuditRun,
    Dispute,
    EarningsHold,
    EscrowHold,
    LedgerEntry,
    LedgerTransaction,
    Order,
    PayoutRequest,
    Settlement,
)

# A hold's state must name the kind of its resolving transaction.
_STATE_FOR_KIND = {
    LedgerTransaction.Kind.CAPTURE: EscrowHold.State.CAPTURED,
    LedgerTransaction.Kind.RELEASE: EscrowHold.State.RELEASED,
}


def audit_ledger() -> list[str]:
    """Every violated invariant, one readable line each; [] when the ledger is consistent."""
    violations: list[str] = []
    violations += _entries_balance()
    violations += _account_balances()
    violations += _orphan_accounts()
    violations += _holds()
    violations += _orders()
    violations += _earnings_holds()
    violations += _disputes()
    violations += _payouts()
    violations += _reversals()
    return violations


def record_audit_run(source: str = "command") -> AuditRun:
    """Run the audit and keep its result (one AuditRun row) for the ops dashboard."""
    started = time.monotonic()
    violations = audit_ledger()
    transactions, entries = ledger_counts()
    return AuditRun.objects.create(
        ok=not violations,
        violation_count=len(violations),
        violations="\n".join(violations),
        transaction_count=transactions,
        entry_count=entries,
        duration_ms=int((time.monotonic() - started) * 1000),
        source=source,
    )


BATCH = 5000


def _batched(rows):
    """Iterate a pk-ordered values()/values_list() queryset (pk first in values_list) in pages
    of BATCH by keyset pagination: bounded memory on a ledger of any size, and, unlike a
    server-side cursor, a single plain query while the table is small."""
    last = None
    while True:
        page = list((rows if last is None else rows.filter(pk__gt=last))[:BATCH])
        yield from page
        if len(page) < BATCH:
            return
        row = page[-1]
        last = row["pk"] if isinstance(row, dict) else row[0]


def ledger_counts() -> tuple[int, int]:
    """(transactions, entries), for the audit's summary line."""
    return LedgerTransaction.objects.count(), LedgerEntry.objects.count()


def _entries_balance() -> list[str]:
    # One grouped query: balanced transactions add 0 to the whole ledger's sum, so that sum is
    # the sum of the unbalanced ones.
    unbalanced = list(
        LedgerEntry.objects.values("transaction_id")
        .annotate(total=Sum("amount"))
        .exclude(total=0)
        .order_by("transaction_id")
        .values_list("transaction_id", "total")
    )
    found: list[str] = []
    total = sum(amount for _, amount in unbalanced)
    if total != 0:
        found.append(f"the entries of the whole ledger sum to {total}, not 0")
    for txn_id, amount in unbalanced:
        found.append(f"transaction #{txn_id} entries sum to {amount}, not 0")
    return found


def _account_balances() -> list[str]:
    found: list[str] = []
    wrong = (
        Account.objects.annotate(entry_sum=Coalesce(Sum("entries__amount"), Value(0)))
        .filter(~Q(balance=F("entry_sum")) | (Q(balance__lt=0) & ~Q(kind=Account.Kind.WORLD)))
        .order_by("pk")
        .values_list("pk", "kind", "balance", "entry_sum")
    )
    negative = []
    for pk, kind, balance, entry_sum in wrong:
        if balance != entry_sum:
            found.append(
                f"account #{pk} ({kind}) balance {balance} != sum of its entries {entry_sum}"
            )
        if balance < 0 and kind != Account.Kind.WORLD:
            negative.append(f"account #{pk} ({kind}) is below zero: {balance}")
    return found + negative


def _orphan_accounts() -> list[str]:
    """Money in a per-record account (escrow, frozen share, payout) whose record is missing."""
    orphans = (
        Account.objects.filter(
            Q(kind=Account.Kind.ESCROW, hold__isnull=True)
            | Q(kind=Account.Kind.FROZEN, earnings_hold__isnull=True)
            | Q(kind=Account.Kind.PAYOUT, payout__isnull=True)
        )
        .exclude(balance=0)
        .order_by("pk")
        .values_list("pk", "kind", "balance")
    )
    owner = {
        Account.Kind.ESCROW: ("escrow", "hold"),
        Account.Kind.FROZEN: ("frozen", "share"),
        Account.Kind.PAYOUT: ("payout", "payout request"),
    }
    found = []
    for pk, kind, balance in orphans:
        label, record = owner[kind]
        found.append(f"{label} account #{pk} holds {balance} but belongs to no {record}")
    return found


def _holds() -> list[str]:
    found: list[str] = []
    # The unique resolves_hold column makes a second resolution impossible; counting anyway
    # means the audit still says so if that constraint is ever dropped.
    repeated = (
        LedgerTransaction.objects.filter(resolves_hold__isnull=False)
        .values("resolves_hold_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    for row in repeated:
        found.append(f"hold #{row['resolves_hold_id']} was resolved {row['n']} times")

    open_amounts = 0
    open_escrow = 0
    rows = EscrowHold.objects.values(
        "pk", "order_id", "state", "amount", "account__balance", "resolution__kind"
    ).order_by("pk")
    for hold in _batched(rows):
        label = f"hold #{hold['pk']} of order {hold['order_id']}"
        kind = hold["resolution__kind"]
        state = hold["state"]
        escrow = hold["account__balance"]
        if state == EscrowHold.State.OPEN:
            open_amounts += hold["amount"]
            open_escrow += escrow
            if kind is not None:
                found.append(f"{label} is open but has a {kind} resolution")
            if escrow != hold["amount"]:
                found.append(f"{label} is open for {hold['amount']} but its escrow holds {escrow}")
        else:
            if kind is None:
                found.append(f"{label} is {state} but has no resolving transaction")
            elif _STATE_FOR_KIND.get(kind) != state:
                found.append(f"{label} is {state} but was resolved by a {kind} transaction")
            if escrow != 0:
                found.append(f"{label} is {state} but its escrow account still holds {escrow}")
    if open_amounts != open_escrow:
        found.append(
            f"open holds total {open_amounts} but their escrow accounts hold {open_escrow}"
        )

    return found


def _orders() -> list[str]:
    found: list[str] = []
    # One query for every order-level rule; each row is classified below.
    suspicious = (
        Order.objects.filter(
            Q(hold__isnull=True)
            | Q(state__in=Order.ENDED_STATES, hold__state=EscrowHold.State.OPEN)
            | Q(state__in=Order.COMPLETED_STATES, settlement__isnull=True)
            | Q(state__in=(Order.State.DISPUTED, Order.State.RESOLVED), dispute__isnull=True)
        )
        .order_by("pk")
        .values_list("pk", "state", "hold__id", "hold__state", "settlement__id", "dispute__id")
    )
    no_hold, unresolved, unsettled, undisputed = [], [], [], []
    for pk, state, hold_id, hold_state, settlement_id, dispute_id in suspicious:
        if hold_id is None:
            no_hold.append(f"order {pk} has no escrow hold")
        if state in Order.ENDED_STATES and hold_state == EscrowHold.State.OPEN:
            unresolved.append(f"order {pk} is {state} but its hold is still open")
        if state in Order.COMPLETED_STATES and settlement_id is None:
            unsettled.append(f"order {pk} is {state} but has no settlement")
        if state in (Order.State.DISPUTED, Order.State.RESOLVED) and dispute_id is None:
            undisputed.append(f"order {pk} is {state} but has no dispute")
    found += no_hold + unresolved + unsettled + undisputed

    settlements = Settlement.objects.values_list(
        "pk",
        "order_id",
        "order__state",
        "transaction_id",
        "order__hold__amount",
        "order__hold__resolution__id",
        "captured",
        "released",
        "fee",
        "provider_amount",
        "order__earnings_hold__id",
    ).order_by("pk")
    for (
        pk,
        order_id,
        order_state,
        transaction_id,
        hold_amount,
        resolution_id,
        captured,
        released,
        fee,
        provider_amount,
        share_id,
    ) in _batched(settlements):
        label = f"settlement #{pk} of order {order_id}"
        if order_state not in Order.ENDED_STATES:
            found.append(f"{label}: the order is still {order_state}")
        if transaction_id != resolution_id:
            found.append(f"{label}: its transaction is not the resolution of the order's hold")
        if captured + released != hold_amount:
            found.append(
                f"{label}: captured {captured} + released {released} != hold {hold_amount}"
            )
        if fee + provider_amount != captured:
            found.append(f"{label}: fee {fee} + provider {provider_amount} != captured {captured}")
        if captured > 0 and share_id is None:
            found.append(f"{label} captured money but froze no share")
    return found


_KIND_FOR_SHARE_STATE = {
    EarningsHold.State.RELEASED: LedgerTransaction.Kind.EARNED,
    EarningsHold.State.RESOLVED: LedgerTransaction.Kind.DISPUTE,
}


def _earnings_holds() -> list[str]:
    found: list[str] = []
    rows = EarningsHold.objects.values(
        "pk",
        "order_id",
        "state",
        "amount",
        "provider_id",
        "account__balance",
        "account__kind",
        "account__user_id",
        "order__settlement__provider_amount",
        "order__listing__owner_id",
        "resolution__kind",
        "resolution__once_key",
    ).order_by("pk")
    for h in _batched(rows):
        label = f"frozen share #{h['pk']} of order {h['order_id']}"
        if h["amount"] != h["order__settlement__provider_amount"]:
            found.append(
                f"{label} is {h['amount']} but the settlement's provider share is "
                f"{h['order__settlement__provider_amount']}"
            )
        if not h["provider_id"] == h["account__user_id"] == h["order__listing__owner_id"]:
            found.append(f"{label} does not belong to the listing's owner")
        if h["account__kind"] != Account.Kind.FROZEN:
            found.append(f"{label} sits in a {h['account__kind']} account")
        balance = h["account__balance"]
        if h["state"] in (EarningsHold.State.FROZEN, EarningsHold.State.DISPUTED):
            if balance != h["amount"]:
                found.append(
                    f"{label} is {h['state']} for {h['amount']} but its account holds {balance}"
                )
            if h["resolution__kind"] is not None:
                found.append(f"{label} is {h['state']} but has a resolution")
        else:
            if balance != 0:
                found.append(f"{label} is {h['state']} but its account still holds {balance}")
            if h["resolution__kind"] != _KIND_FOR_SHARE_STATE.get(h["state"]):
                found.append(f"{label} is {h['state']} but was resolved by {h['resolution__kind']}")
            elif h["resolution__once_key"] != f"earnings:{h['pk']}":
                found.append(f"{label} was resolved by a transaction not keyed to it")
    return found


def _disputes() -> list[str]:
    found: list[str] = []
    rows = Dispute.objects.values(
        "pk",
        "order_id",
        "state",
        "refund",
        "order__state",
        "order__settlement__captured",
        "order__earnings_hold__state",
    ).order_by("pk")
    expected = {
        Dispute.State.OPEN: (Order.State.DISPUTED, EarningsHold.State.DISPUTED),
        Dispute.State.RESOLVED: (Order.State.RESOLVED, EarningsHold.State.RESOLVED),
    }
    for d in _batched(rows):
        label = f"dispute #{d['pk']} of order {d['order_id']}"
        order_state, share_state = expected[d["state"]]
        if d["order__state"] != order_state:
            found.append(f"{label} is {d['state']} but the order is {d['order__state']}")
        if d["order__earnings_hold__state"] != share_state:
            found.append(
                f"{label} is {d['state']} but the frozen share is "
                f"{d['order__earnings_hold__state']}"
            )
        captured = d["order__settlement__captured"] or 0
        if d["refund"] is not None and not 0 <= d["refund"] <= captured:
            found.append(f"{label} refunded {d['refund']} of {captured} captured")
    return found


_KIND_FOR_PAYOUT_STATE = {
    PayoutRequest.State.PAID: LedgerTransaction.Kind.PAYOUT,
    PayoutRequest.State.REJECTED: LedgerTransaction.Kind.PAYOUT_REJECTED,
}


def _payouts() -> list[str]:
    found: list[str] = []
    rows = PayoutRequest.objects.values(
        "pk",
        "state",
        "amount",
        "provider_id",
        "account__balance",
        "account__kind",
        "account__user_id",
        "resolution__kind",
        "resolution__once_key",
    ).order_by("pk")
    for p in _batched(rows):
        label = f"payout #{p['pk']}"
        if p["account__kind"] != Account.Kind.PAYOUT or p["account__user_id"] != p["provider_id"]:
            found.append(f"{label} sits in an account not its provider's payout account")
        balance = p["account__balance"]
        if p["state"] == PayoutRequest.State.REQUESTED:
            if balance != p["amount"]:
                found.append(
                    f"{label} is requested for {p['amount']} but its account holds {balance}"
                )
        else:
            if balance != 0:
                found.append(f"{label} is {p['state']} but its account still holds {balance}")
            if p["resolution__kind"] != _KIND_FOR_PAYOUT_STATE[p["state"]]:
                found.append(f"{label} is {p['state']} but was resolved by {p['resolution__kind']}")
            elif p["resolution__once_key"] != f"payout:{p['pk']}":
                found.append(f"{label} was resolved by a transaction not keyed to it")
    return found


def _reversals() -> list[str]:
    found: list[str] = []
    pairs = []
    for pk, reverses_id in (
        LedgerTransaction.objects.filter(
            Q(kind=LedgerTransaction.Kind.REVERSAL) | Q(reverses__isnull=False)
        )
        .order_by("pk")
        .values_list("pk", "reverses_id")
    ):
        if reverses_id is None:
            found.append(f"reversal #{pk} does not name the transaction it reverses")
        else:
            pairs.append((pk, reverses_id))
    if not pairs:
        return found
    legs: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    ids = {pk for pair in pairs for pk in pair}
    for txn_id, account_id, amount in LedgerEntry.objects.filter(
        transaction_id__in=ids
    ).values_list("transaction_id", "account_id", "amount"):
        legs[txn_id][account_id] += amount
    for reversal, original in sorted(pairs):
        negated = {account: -amount for account, amount in legs[original].items()}
        if dict(legs[reversal]) != negated:
            found.append(f"reversal #{reversal} is not the exact opposite of #{original}")
    return found
