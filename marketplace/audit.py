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
- a multi-node order's one hold (marketplace.cluster_ledger) holds its amount less its parts'
  captures while open, and was resolved by a release once every part ended; a part has no hold
  of its own and settles by its own part capture, within its share;
- every order has a hold; every ended order's hold is resolved; a completed (or disputed, or
  resolved) order has a settlement, and a settlement belongs to an ended order, is its hold's
  resolution and splits the hold exactly (captured + released == hold, fee + provider ==
  captured);
- every settlement that captured money froze exactly the provider's share in an EarningsHold;
  a frozen or disputed share's account holds exactly its amount, a released or resolved one's
  holds nothing and was resolved by the matching transaction; no frozen account lacks a share;
- disputes agree with their orders and shares, and a refund never exceeds what was captured;
- a payout request's account holds its amount until it is paid or rejected, then nothing;
- every reversal names the transaction it reverses and is its exact negation;
- a paid card top-up (CheckoutSession) was credited by one CARD transaction keyed to it that put
  exactly its amount into its buyer's wallet, and every CARD transaction is such a credit.

`record_audit_run()` runs the audit and stores the result as an AuditRun (the ops dashboard
shows the latest); `manage.py audit_ledger` and the hourly beat task call it.
"""

from __future__ import annotations

import time
from collections import defaultdict

from django.db.models import Count, Exists, F, OuterRef, Q, Sum, Value
from django.db.models.functions import Coalesce

from marketplace.models import (
    Account,
    AuditRun,
    CheckoutSession,
    Cluster,
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
    violations += _clusters()
    violations += _earnings_holds()
    violations += _disputes()
    violations += _payouts()
    violations += _reversals()
    violations += _card_top_ups()
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
    # What each multi-node order's parts captured from its one hold (one grouped query).
    part_captures = dict(
        Settlement.objects.filter(order__cluster__isnull=False)
        .values("order__cluster_id")
        .annotate(total=Sum("captured"))
        .values_list("order__cluster_id", "total")
    )
    rows = EscrowHold.objects.values(
        "pk", "order_id", "cluster_id", "state", "amount", "account__balance", "resolution__kind"
    ).order_by("pk")
    for hold in _batched(rows):
        cluster_id = hold["cluster_id"]
        whose = f"order {hold['order_id']}" if cluster_id is None else f"cluster {cluster_id}"
        label = f"hold #{hold['pk']} of {whose}"
        kind = hold["resolution__kind"]
        state = hold["state"]
        escrow = hold["account__balance"]
        # A cluster's hold is drawn on by its parts' captures before it is resolved
        # (marketplace.cluster_ledger): open, it holds its amount less those.
        captured = part_captures.get(cluster_id, 0) if cluster_id is not None else 0
        if state == EscrowHold.State.OPEN:
            open_amounts += hold["amount"] - captured
            open_escrow += escrow
            if kind is not None:
                found.append(f"{label} is open but has a {kind} resolution")
            if escrow != hold["amount"] - captured:
                found.append(
                    f"{label} is open for {hold['amount']} less {captured} its parts captured "
                    f"but its escrow holds {escrow}"
                )
        elif cluster_id is not None:
            # Resolved by releasing what its parts left: captured if any part captured.
            want = EscrowHold.State.CAPTURED if captured else EscrowHold.State.RELEASED
            if kind != LedgerTransaction.Kind.RELEASE:
                found.append(f"{label} is {state} but its resolution is {kind}, not a release")
            if state != want:
                found.append(f"{label} is {state} but its parts captured {captured}")
            if escrow != 0:
                found.append(f"{label} is {state} but its escrow account still holds {escrow}")
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
            Q(hold__isnull=True, cluster__isnull=True)
            | Q(hold__isnull=False, cluster__isnull=False)
            | Q(state__in=Order.ENDED_STATES, hold__state=EscrowHold.State.OPEN)
            | Q(state__in=Order.COMPLETED_STATES, settlement__isnull=True)
            | Q(state__in=(Order.State.DISPUTED, Order.State.RESOLVED), dispute__isnull=True)
        )
        .order_by("pk")
        .values_list(
            "pk", "state", "hold__id", "hold__state", "settlement__id", "dispute__id", "cluster_id"
        )
    )
    no_hold, unresolved, unsettled, undisputed = [], [], [], []
    for pk, state, hold_id, hold_state, settlement_id, dispute_id, cluster_id in suspicious:
        if hold_id is None and cluster_id is None:
            no_hold.append(f"order {pk} has no escrow hold")
        if hold_id is not None and cluster_id is not None:
            no_hold.append(f"order {pk} is a part of cluster {cluster_id} but has a hold")
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
        "order__cluster_id",
        "order__hold_amount",
        "transaction__kind",
        "transaction__once_key",
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
        cluster_id,
        share,
        txn_kind,
        once_key,
    ) in _batched(settlements):
        label = f"settlement #{pk} of order {order_id}"
        if order_state not in Order.ENDED_STATES:
            found.append(f"{label}: the order is still {order_state}")
        if cluster_id is not None:
            # A part settles by its own capture from the cluster's hold, within its share.
            hold_amount = share
            if txn_kind != LedgerTransaction.Kind.PART_CAPTURE or once_key != f"part:{order_id}":
                found.append(f"{label}: its transaction is not the part's capture")
        elif transaction_id != resolution_id:
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


def _clusters() -> list[str]:
    """Every multi-node order has one hold, resolved once all its parts ended (and open while
    one lives); every part capture is the transaction of one part's settlement."""
    found: list[str] = []
    live = Order.objects.filter(cluster=OuterRef("pk"), state__in=Order.LIVE_STATES)
    rows = (
        Cluster.objects.annotate(has_live=Exists(live))
        .filter(
            Q(hold__isnull=True)
            | Q(has_live=False, hold__state=EscrowHold.State.OPEN)
            | (Q(has_live=True) & ~Q(hold__state=EscrowHold.State.OPEN))
        )
        .order_by("pk")
        .values_list("pk", "hold__id", "hold__state", "has_live")
    )
    for pk, hold_id, hold_state, has_live in rows:
        if hold_id is None:
            found.append(f"cluster {pk} has no escrow hold")
        elif has_live:
            found.append(f"cluster {pk} has live parts but its hold is {hold_state}")
        else:
            found.append(f"cluster {pk} ended but its hold is still open")
    stray = (
        LedgerTransaction.objects.filter(
            kind=LedgerTransaction.Kind.PART_CAPTURE, settlement__isnull=True
        )
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    for pk in stray:
        found.append(f"part capture #{pk} is no part's settlement")
    return found


def _one_account_held(
    label: str, row: dict, *, open_states: tuple, kind_for_state: dict, once_key: str
) -> list[str]:
    """The checks of an amount parked in an account of its own until one transaction resolves
    it (a frozen share, a payout request): while open, the account holds exactly the amount and
    nothing resolved it; once resolved, the account is empty and the one transaction keyed
    `once_key`, of the kind the state implies, resolved it. `row` has state, amount,
    account__balance, resolution__kind and resolution__once_key."""
    found: list[str] = []
    state, balance = row["state"], row["account__balance"]
    if state in open_states:
        if balance != row["amount"]:
            found.append(f"{label} is {state} for {row['amount']} but its account holds {balance}")
        if row["resolution__kind"] is not None:
            found.append(f"{label} is {state} but has a resolution")
        return found
    if balance != 0:
        found.append(f"{label} is {state} but its account still holds {balance}")
    if row["resolution__kind"] != kind_for_state.get(state):
        found.append(f"{label} is {state} but was resolved by {row['resolution__kind']}")
    elif row["resolution__once_key"] != once_key:
        found.append(f"{label} was resolved by a transaction not keyed to it")
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
        found += _one_account_held(
            label,
            h,
            open_states=(EarningsHold.State.FROZEN, EarningsHold.State.DISPUTED),
            kind_for_state=_KIND_FOR_SHARE_STATE,
            once_key=f"earnings:{h['pk']}",
        )
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
        found += _one_account_held(
            label,
            p,
            open_states=(PayoutRequest.State.REQUESTED,),
            kind_for_state=_KIND_FOR_PAYOUT_STATE,
            once_key=f"payout:{p['pk']}",
        )
    return found


def _card_top_ups() -> list[str]:
    found: list[str] = []
    into_wallets: dict[int, tuple[int | None, int]] = {
        row["transaction_id"]: (row["account__user_id"], row["total"])
        for row in LedgerEntry.objects.filter(
            transaction__kind=LedgerTransaction.Kind.CARD, account__kind=Account.Kind.WALLET
        )
        .values("transaction_id", "account__user_id")
        .annotate(total=Sum("amount"))
    }
    rows = (
        CheckoutSession.objects.filter(credit__isnull=False)
        .values("pk", "amount", "user_id", "credit_id", "credit__kind", "credit__once_key")
        .order_by("pk")
    )
    for c in _batched(rows):
        label = f"card top-up #{c['pk']}"
        if c["credit__kind"] != LedgerTransaction.Kind.CARD:
            found.append(f"{label} was credited by a {c['credit__kind']} transaction")
        elif c["credit__once_key"] != f"checkout:{c['pk']}":
            found.append(f"{label} was credited by a transaction not keyed to it")
        if into_wallets.pop(c["credit_id"], None) != (c["user_id"], c["amount"]):
            found.append(f"{label} did not put exactly its amount into its buyer's wallet")
    for txn_id in sorted(into_wallets):
        found.append(f"card transaction #{txn_id} belongs to no paid card top-up")
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
