"""The one escrow hold of a multi-node order, and how its parts draw on it.

A cluster's hold is one two-phase transfer in the sense of design/money.md, with the one
extension a multi-node order needs, multi-capture (Stripe's "multicapture" on one
PaymentIntent): it is placed once for the total of the parts' quotes (one HOLD transaction, so
the wallet's guard checks the funds once, for the total); each part's settlement captures that
part's charge from it (a PART_CAPTURE transaction, at most the part's share, Order.hold_amount,
keyed `part:<order id>` so a part captures at most once); the end of the last part resolves
the hold, releasing what is left to the buyer (a RELEASE transaction whose unique
`resolves_hold` makes that at most once).

Why not one capture at the very end, as TigerBeetle's post of a pending transfer: a part lost
under on_part_loss="degrade" is settled while the rest run for days, and its provider's share
must start its dispute window then, not when the last part stops.

Locks, after the node and order rows the caller holds: the Cluster row, then the hold row,
then accounts (ledger.post). Every path that moves a cluster's money takes the cluster row
first, so two parts ending at once on two nodes queue on it and the second sees the first's
end (READ COMMITTED reads committed rows after the lock is granted): exactly one of them finds
every part ended and releases the rest.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from marketplace import ledger
from marketplace.cluster_models import Cluster
from marketplace.cluster_state import all_ended
from marketplace.errors import AlreadyResolved
from marketplace.models import Account, EscrowHold, LedgerTransaction, Order
from marketplace.signals import cluster_part_lost


def place_cluster_hold(cluster: Cluster, amount: int) -> EscrowHold:
    """Move `amount` from the buyer's wallet into one fresh escrow account for `cluster`: one
    HOLD transaction. Raises InsufficientFunds (and writes nothing) when the wallet cannot cover
    the total."""
    with transaction.atomic():
        escrow = Account.objects.create(kind=Account.Kind.ESCROW, user=cluster.buyer)
        ledger.post(
            LedgerTransaction.Kind.HOLD,
            [(ledger.wallet_account(cluster.buyer), -amount), (escrow, amount)],
            memo=f"hold for multi-node order {cluster.pk}",
        )
        return EscrowHold.objects.create(cluster=cluster, account=escrow, amount=amount)


def _lock_cluster_and_hold(cluster_id: int) -> tuple[Cluster, EscrowHold]:
    cluster = Cluster.objects.select_for_update().get(pk=cluster_id)
    # of=self: the escrow account's row is locked by ledger.post's guarded update, with the
    # other legs, in primary-key order; the Cluster lock already serializes its movements.
    hold = (
        EscrowHold.objects.select_for_update(of=("self",))
        .select_related("account")
        .get(cluster=cluster)
    )
    return cluster, hold


def capture_part(
    order: Order, *, captured: int, fee: int, earnings: Account | None
) -> LedgerTransaction:
    """Capture `captured` of `order`'s share from its cluster's hold: `captured - fee` to
    `earnings` (the part's frozen provider account), `fee` to platform fees. At most once per
    part (once_key `part:<id>`: a second raises AlreadyResolved, moving nothing) and never
    beyond the part's share; a part that captures nothing still gets its (empty) transaction,
    so its Settlement has one. Locks: the cluster row, the hold row, then accounts."""
    if not 0 <= captured <= order.hold_amount or not 0 <= fee <= captured:
        raise ValueError(f"cannot capture {captured} (fee {fee}) of a {order.hold_amount} share")
    if captured and earnings is None:
        raise ValueError("a capture needs the provider's frozen account")
    with transaction.atomic():
        _, hold = _lock_cluster_and_hold(order.cluster_id)
        if hold.state != EscrowHold.State.OPEN:
            raise AlreadyResolved(f"the hold of multi-node order {order.cluster_id} is resolved")
        legs = []
        if captured:
            legs = [(hold.account, -captured), (earnings, captured - fee)]
            legs.append((ledger.fees_account(), fee))
        return ledger.post(
            LedgerTransaction.Kind.PART_CAPTURE,
            legs,
            memo=f"settlement of order {order.pk}, part {order.part_index} of "
            f"multi-node order {order.cluster_id}",
            once_key=f"part:{order.pk}",
        )


def part_ended(order: Order) -> bool:
    """Called in the transaction that ended `order` (a part), after its own money moved (its
    capture, if it ran). Resolves the cluster's hold once every part has ended: what is left
    goes back to the buyer. A part that *failed* while others live under on_part_loss="end"
    marks the cluster ended by loss (compare-and-set from NULL) and sends cluster_part_lost,
    whose receiver stops the others after commit (in their own transaction: stopping them here
    would lock other nodes' rows while this one's is held, against the node-first lock order).
    Returns True when this call resolved the hold. Locks: the cluster row, the hold row,
    accounts."""
    cluster, hold = _lock_cluster_and_hold(order.cluster_id)
    states = list(Order.objects.filter(cluster=cluster).values_list("state", flat=True))
    if not all_ended(states):
        if (
            order.state == Order.State.FAILED
            and cluster.on_part_loss == Cluster.OnPartLoss.END
            and cluster.ended_by_loss_at is None
        ):
            why = f"part {order.part_index} (order {order.pk}) failed: {order.reason}"[:200]
            Cluster.objects.filter(pk=cluster.pk, ended_by_loss_at__isnull=True).update(
                ended_by_loss_at=timezone.now(), reason=why
            )
            cluster_part_lost.send(sender=Cluster, cluster_id=cluster.pk)
        return False
    if hold.state != EscrowHold.State.OPEN:
        return False
    remainder = hold.account.balance
    captured_any = remainder != hold.amount
    ledger.post(
        LedgerTransaction.Kind.RELEASE,
        [(hold.account, -remainder), (ledger.wallet_account(cluster.buyer), remainder)],
        memo=f"multi-node order {cluster.pk} ended: the rest of its hold released",
        resolves_hold=hold,
    )
    state = EscrowHold.State.CAPTURED if captured_any else EscrowHold.State.RELEASED
    EscrowHold.objects.filter(pk=hold.pk, state=EscrowHold.State.OPEN).update(
        state=state, resolved_at=timezone.now()
    )
    return True
