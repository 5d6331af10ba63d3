"""A Hypothesis state machine over every money path: grants, top-ups and their reversal,
orders, multi-node orders (two parts on two nodes, one hold; stopped whole, or a part lost
under "end" or "degrade"), provisioning, the agent's acks, stops, cancels, expiry, node
silences (outages and lost nodes), metering and the bandwidth allowance, settlement retries,
the dispute window, disputes and their resolution, payout requests paid or rejected, and
crash-and-retry steps (an operation whose transaction dies before commit, then runs again).
After every step that wrote to the database the ledger audit must be clean and the money of
every party must add up (a step that wrote nothing cannot change what they read; about half the
steps are refusals and no-ops, and the checks were most of the test's time).

Issue 4 asks for at least 200 examples of 30+ steps in CI: that is the default here
(MOLT_PROPERTY_EXAMPLES and MOLT_PROPERTY_STEPS change it). Each example runs inside a savepoint
rolled back at its end, so the database does not grow across examples and the audit, which
reads the whole ledger, stays as cheap on the 200th example as on the first. On failure
Hypothesis prints the failing steps and a blob to reproduce them (`print_blob=True`).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from datetime import timedelta
from itertools import pairwise

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Count, Sum
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from marketplace import ledger, payments
from marketplace.audit import audit_ledger
from marketplace.clusters import PartSpec, place_cluster, stop_cluster, sweep_lost_clusters
from marketplace.errors import MarketError
from marketplace.listings import create_listing
from marketplace.models import (
    Account,
    Dispute,
    EarningsHold,
    EscrowHold,
    LedgerTransaction,
    Order,
    OrderTransition,
    PayoutRequest,
    Settlement,
)
from marketplace.orders import (
    BANDWIDTH_USED_UP,
    add_traffic,
    end_orders_of_lost_nodes,
    expire_orders,
    place_order,
    provision_order,
    stop_if_allowance_used,
    stop_order,
)
from marketplace.settlement import settle_order
from meshnet.agent_channel import acknowledge_revision
from meshnet.models import Node
from meshnet.nodes import record_heartbeat
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.property, pytest.mark.db, pytest.mark.django_db]

LIVE = {"pending", "provisioning", "running", "stopping"}
EXAMPLES = int(os.environ.get("MOLT_PROPERTY_EXAMPLES", "200"))
STEPS = int(os.environ.get("MOLT_PROPERTY_STEPS", "30"))
MIN_STEPS = min(30, STEPS)

pick = st.integers(min_value=0, max_value=15)
percent = st.integers(min_value=0, max_value=100)


CRASHES = ("ack", "provision", "expire", "release", "resolve", "payout", "stop", "lost_node")


class Crash(Exception):
    """The process died here: the transaction around the operation never commits."""


class MoneyMachine(RuleBasedStateMachine):
    # Set by the test: users, node and listing made once, outside the per-example savepoint.
    fixtures: dict = {}
    runs: list[int] = []
    reached: Counter = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.savepoint = transaction.savepoint()
        self.buyer = self.fixtures["buyer"]
        self.provider = self.fixtures["provider"]
        self.operator = self.fixtures["operator"]
        self.node = self.fixtures["node"]
        self.listing = self.fixtures["listing"]
        # A second node and listing, for the second part of multi-node orders; its agent
        # acknowledges with the first's but never sends heartbeats (never lost).
        self.node2 = self.fixtures["node2"]
        self.listing2 = self.fixtures["listing2"]
        self.cluster_ids: list[int] = []
        self.now = timezone.now()
        self.order_ids: list[int] = []
        self.grants: list[tuple[int, int]] = []  # (transaction id, amount) not reversed
        self.granted = 0
        self.checked_at_writes: int | None = None  # _rows_written_so_far() when last checked
        self.steps = 0
        self.grant(100 * USD)  # enough for a few orders, so examples get past the wallet
        self.grants.clear()  # that first grant stays: reversals drain only later credits
        self.steps = 0

    def teardown(self) -> None:
        reached = type(self).reached
        reached["settled"] += Settlement.objects.count()
        reached["share released"] += EarningsHold.objects.filter(state="released").count()
        for state, n in Dispute.objects.values_list("state").annotate(n=Count("id")):
            reached[f"dispute {state}"] += n
        for state, n in PayoutRequest.objects.values_list("state").annotate(n=Count("id")):
            reached[f"payout {state}"] += n
        reached["reversal"] += LedgerTransaction.objects.filter(kind="reversal").count()
        reached["lost node"] += Order.objects.filter(reason__contains="offline since").count()
        reached["allowance used up"] += Order.objects.filter(reason=BANDWIDTH_USED_UP).count()
        reached["outage billed"] += Settlement.objects.filter(offline_seconds__gt=0).count()
        reached["multi-node hold resolved"] += (
            EscrowHold.objects.filter(cluster__isnull=False).exclude(state="open").count()
        )
        reached["multi-node part captured"] += Settlement.objects.filter(
            order__cluster__isnull=False, captured__gt=0
        ).count()
        reached["multi-node ended by loss"] += (
            Order.objects.filter(cluster__ended_by_loss_at__isnull=False)
            .values("cluster_id")
            .distinct()
            .count()
        )
        transaction.savepoint_rollback(self.savepoint)
        type(self).runs.append(self.steps)

    def _order(self, i: int, states: tuple[str, ...] = ()) -> Order | None:
        """The i-th (modulo) of this example's orders, among those in `states` if given."""
        orders = Order.objects.filter(pk__in=self.order_ids).order_by("pk")
        if states:
            orders = orders.filter(state__in=states)
        found = list(orders)
        return found[i % len(found)] if found else None

    def _ack_all(self, at) -> None:
        for node in (self.node, self.node2):
            node.refresh_from_db()
            acknowledge_revision(node, node.desired_revision, at=at)

    def _step(self) -> None:
        self.steps += 1

    # --- money in --------------------------------------------------------------------------

    @rule(amount=st.integers(min_value=1, max_value=40).map(lambda usd: usd * USD - 1))
    def grant(self, amount: int) -> None:
        self._step()
        txn = ledger.grant_credits(self.buyer, amount)
        self.grants.append((txn.pk, amount))
        self.granted += amount

    @rule(amount=st.integers(min_value=1, max_value=20).map(lambda usd: usd * USD + 7))
    def top_up(self, amount: int) -> None:
        self._step()
        txn = payments.top_up(self.buyer, amount, by=self.operator)
        self.grants.append((txn.pk, amount))
        self.granted += amount

    @precondition(lambda self: self.grants)
    @rule(i=pick)
    def reverse_a_grant(self, i: int) -> None:
        """An operator corrects a grant. Refused (moving nothing) when the credits are spent."""
        self._step()
        txn_id, amount = self.grants[i % len(self.grants)]
        try:
            ledger.reverse_transaction(LedgerTransaction.objects.get(pk=txn_id), "correction")
        except MarketError:
            return  # InsufficientFunds: already spent
        self.grants.remove((txn_id, amount))
        self.granted -= amount

    # --- the order lifecycle -------------------------------------------------------------------

    @rule(
        gpu_count=st.integers(min_value=1, max_value=2),
        minutes=st.integers(min_value=0, max_value=6 * 60),
        gib=st.integers(min_value=0, max_value=60),
        hours=st.integers(1, 6),
    )
    def rent_and_return(self, gpu_count: int, minutes: int, gib: int, hours: int) -> None:
        """A whole rental in one step (the granular rules interleave the same paths): placed,
        provisioned, acknowledged `minutes` ago, some traffic, stopped, removal acknowledged."""
        self._step()
        try:
            order = place_order(
                self.buyer,
                listing_id=self.listing.pk,
                gpu_count=gpu_count,
                hours=hours,
                wireguard_public_key=factories.wg_public_key(),
            )
        except MarketError:
            return
        self.order_ids.append(order.pk)
        provision_order(order.pk)
        self._ack_all(self.now - timedelta(minutes=minutes))
        order = Order.objects.get(pk=order.pk)
        if order.state == "running":
            add_traffic(order.job_peer, rx_bytes=gib << 30, tx_bytes=0)
            stop_if_allowance_used(order.job_peer)
            with contextlib.suppress(MarketError):
                stop_order(Order.objects.get(pk=order.pk))
        self._ack_all(self.now)

    @rule(gpu_count=st.integers(min_value=1, max_value=2), hours=st.integers(1, 6))
    def place_order(self, gpu_count: int, hours: int) -> None:
        self._step()
        try:
            order = place_order(
                self.buyer,
                listing_id=self.listing.pk,
                gpu_count=gpu_count,
                hours=hours,
                wireguard_public_key=factories.wg_public_key(),
            )
        except MarketError:  # InsufficientFunds, Oversold
            return
        self.order_ids.append(order.pk)

    @rule(
        gpus=st.integers(min_value=1, max_value=2),
        gpus2=st.integers(min_value=1, max_value=2),
        hours=st.integers(1, 6),
        degrade=st.booleans(),
    )
    def place_multi_node_order(self, gpus: int, gpus2: int, hours: int, degrade: bool) -> None:
        """A job on both nodes: two parts, one hold. Its parts join the orders every other
        rule works on (provision, acks, stops, expiry, lost nodes, disputes, crashes)."""
        self._step()
        try:
            cluster = place_cluster(
                self.buyer,
                parts=[
                    PartSpec(self.listing.pk, gpus),
                    PartSpec(self.listing2.pk, gpus2),
                ],
                hours=hours,
                on_part_loss="degrade" if degrade else "end",
                wireguard_public_key=factories.wg_public_key(),
            )
        except MarketError:  # InsufficientFunds, Oversold
            return
        self.cluster_ids.append(cluster.pk)
        self.order_ids += list(cluster.parts.order_by("pk").values_list("pk", flat=True))

    @precondition(lambda self: self.cluster_ids)
    @rule(i=pick, agent_answers=st.booleans())
    def stop_multi_node_order(self, i: int, agent_answers: bool) -> None:
        self._step()
        from marketplace.cluster_models import Cluster

        cluster = Cluster.objects.get(pk=self.cluster_ids[i % len(self.cluster_ids)])
        with contextlib.suppress(MarketError):  # every part already stopping or ended
            stop_cluster(cluster)
        assert not cluster.parts.filter(state__in=("pending", "provisioning", "running")).exists()
        if agent_answers:
            self._ack_all(self.now)

    @precondition(lambda self: self.order_ids)
    @rule(i=pick, agent_answers=st.booleans(), minutes_ago=st.integers(0, 8 * 60))
    def provision(self, i: int, agent_answers: bool, minutes_ago: int) -> None:
        """The provisioning task ran (again, for a retried message); the agent may apply the
        new peer at once, as it usually does."""
        self._step()
        order = self._order(i, ("pending",)) or self._order(i)
        provision_order(order.pk)
        if agent_answers:
            self._ack_all(self.now - timedelta(minutes=minutes_ago))

    @rule(back=st.integers(min_value=0, max_value=3), minutes_ago=st.integers(0, 8 * 60))
    def agent_acks(self, back: int, minutes_ago: int) -> None:
        """The agent applied some revision (the latest, an older one arriving late, or a
        repeat): added peers start billing, removed ones complete and settle their orders."""
        self._step()
        self.node.refresh_from_db()
        revision = max(self.node.desired_revision - back, 0)
        acknowledge_revision(self.node, revision, at=self.now - timedelta(minutes=minutes_ago))

    @precondition(lambda self: self.order_ids)
    @rule(i=pick, agent_answers=st.booleans())
    def stop_or_cancel(self, i: int, agent_answers: bool) -> None:
        self._step()
        order = self._order(i, ("pending", "provisioning", "running")) or self._order(i)
        try:
            stop_order(order)
        except MarketError:
            assert order.state not in ("pending", "provisioning", "running")
        else:
            expected = "stopping" if order.state == "running" else "cancelled"
            assert Order.objects.get(pk=order.pk).state == expected
        if agent_answers:
            self._ack_all(self.now)

    @rule(ahead_minutes=st.integers(min_value=0, max_value=8 * 60), agent_answers=st.booleans())
    def expire(self, ahead_minutes: int, agent_answers: bool) -> None:
        """The beat task runs, maybe late: booked time up -> stopping, provisioning past its
        timeout -> failed, orders of a node silent past the grace -> failed or completed."""
        self._step()
        expire_orders(now=self.now + timedelta(minutes=ahead_minutes))
        sweep_lost_clusters()  # the expire-orders task runs it too
        if agent_answers:
            self._ack_all(self.now)

    @rule(minutes=st.integers(min_value=-8 * 60, max_value=60))
    def heartbeat(self, minutes: int) -> None:
        """The node's agent sends a heartbeat at some time; after a long silence that records
        an outage, which later settlements leave out."""
        self._step()
        record_heartbeat(
            Node.objects.get(pk=self.node.pk), at=self.now + timedelta(minutes=minutes)
        )

    @precondition(lambda self: self.order_ids)
    @rule(i=pick, gib=st.integers(0, 80), mib=st.integers(0, 1023))
    def traffic(self, i: int, gib: int, mib: int) -> None:
        """Metered bytes arrive (as the peer_traffic receiver applies them): past the
        bandwidth allowance the job stops."""
        self._step()
        order = self._order(i, ("running", "stopping"))
        if order is not None:
            add_traffic(order.job_peer, rx_bytes=gib << 30, tx_bytes=mib << 20)
            stop_if_allowance_used(order.job_peer)

    @precondition(lambda self: self.order_ids)
    @rule(i=pick)
    def settle_again(self, i: int) -> None:
        """A retried settlement (the sweep, a redelivered task) never settles twice, and an
        order that is not ready for settlement is refused without moving money."""
        self._step()
        order = self._order(i, ("completed",)) or self._order(i)
        before = Settlement.objects.filter(order=order).values_list("pk", flat=True).first()
        try:
            settlement = settle_order(order)
        except MarketError:
            assert before is None
            return
        assert before is None or settlement.pk == before

    # --- after settlement: the dispute window, disputes, payouts -------------------------------

    @rule(ahead_hours=st.integers(min_value=0, max_value=200))
    def release_earnings(self, ahead_hours: int) -> None:
        self._step()
        payments.release_due_earnings(now=self.now + timedelta(hours=ahead_hours))

    @precondition(lambda self: self.order_ids)
    @rule(i=pick, ahead_hours=st.integers(min_value=0, max_value=60))
    def dispute(self, i: int, ahead_hours: int) -> None:
        self._step()
        order = self._order(i, ("completed", "failed")) or self._order(i)
        try:
            payments.open_dispute(
                order,
                self.buyer,
                "not as described",
                now=timezone.now() + timedelta(hours=ahead_hours),
            )
        except MarketError:
            return
        assert Order.objects.get(pk=order.pk).state == "disputed"

    @precondition(lambda self: Dispute.objects.filter(buyer=self.buyer, state="open").exists())
    @rule(i=pick, share=percent)
    def resolve_dispute(self, i: int, share: int) -> None:
        self._step()
        disputes = list(Dispute.objects.filter(buyer=self.buyer, state="open").order_by("pk"))
        dispute = disputes[i % len(disputes)]
        captured = Settlement.objects.get(order_id=dispute.order_id).captured
        refund = captured * share // 100
        payments.resolve_dispute(dispute, refund=refund, operator=self.operator)

    @rule(share=percent)
    def request_payout(self, share: int) -> None:
        self._step()
        amount = ledger.earnings_for(self.provider) * share // 100
        if amount <= 0:
            return
        payments.request_payout(self.provider, amount)

    @precondition(lambda self: PayoutRequest.objects.filter(state="requested").exists())
    @rule(i=pick, paid=st.booleans())
    def decide_payout(self, i: int, paid: bool) -> None:
        self._step()
        payouts = list(PayoutRequest.objects.filter(state="requested").order_by("pk"))
        payout = payouts[i % len(payouts)]
        if paid:
            payments.mark_payout_paid(payout, operator=self.operator, reference="wire")
        else:
            payments.reject_payout(payout, operator=self.operator, reason="details missing")

    # --- whole paths in one step (the rules above interleave the same calls) -----------------

    @rule(share=percent, paid=st.booleans())
    def payout_round(self, share: int, paid: bool) -> None:
        """Dispute windows pass, the provider asks for part of its earnings, an operator
        decides."""
        self._step()
        payments.release_due_earnings(now=self.now + timedelta(days=30))
        amount = ledger.earnings_for(self.provider) * share // 100
        if amount <= 0:
            return
        payout = payments.request_payout(self.provider, amount)
        if paid:
            payments.mark_payout_paid(payout, operator=self.operator, reference="wire")
        else:
            payments.reject_payout(payout, operator=self.operator, reason="details missing")

    @rule(i=pick, share=percent)
    def dispute_round(self, i: int, share: int) -> None:
        """The buyer disputes a settled order in time; an operator refunds `share` % of it."""
        self._step()
        order = self._order(i, ("completed", "failed"))
        if order is None:
            return
        try:
            dispute = payments.open_dispute(order, self.buyer, "slow")
        except MarketError:
            return  # not charged, or its window closed
        captured = Settlement.objects.get(order=order).captured
        payments.resolve_dispute(dispute, refund=captured * share // 100, operator=self.operator)

    @rule(
        minutes=st.integers(min_value=1, max_value=120),
        multi=st.sampled_from([None, "end", "degrade"]),
    )
    def node_lost_mid_job(self, minutes: int, multi: str | None) -> None:
        """A job runs, the node's heartbeats stop, and the beat task runs past the grace: the
        node's running orders fail and stopping ones complete, billed to its last heartbeat.
        With `multi`, the job is a multi-node order across both nodes whose buyer chose that
        for a lost part: the first node's part fails, the other ends or runs on."""
        self._step()
        try:
            if multi is None:
                placed = [
                    place_order(
                        self.buyer,
                        listing_id=self.listing.pk,
                        gpu_count=1,
                        hours=4,
                        wireguard_public_key=factories.wg_public_key(),
                    )
                ]
            else:
                cluster = place_cluster(
                    self.buyer,
                    parts=[
                        PartSpec(self.listing.pk, 1),
                        PartSpec(self.listing2.pk, 1),
                    ],
                    hours=4,
                    on_part_loss=multi,
                    wireguard_public_key=factories.wg_public_key(),
                )
                self.cluster_ids.append(cluster.pk)
                placed = list(cluster.parts.order_by("pk"))
        except MarketError:
            placed = []
        for order in placed:
            self.order_ids.append(order.pk)
            provision_order(order.pk)
        if placed:
            self._ack_all(self.now - timedelta(minutes=minutes))
        record_heartbeat(Node.objects.get(pk=self.node.pk), at=self.now)
        last_seen = Node.objects.values_list("last_seen_at", flat=True).get(pk=self.node.pk)
        grace = timedelta(seconds=django_settings.MOLT_NODE_FAILURE_GRACE_SECONDS)
        expire_orders(now=last_seen + grace + timedelta(seconds=1))
        sweep_lost_clusters()

    # --- crashes -----------------------------------------------------------------------------

    @rule(what=st.sampled_from(CRASHES), i=pick)
    def crash_and_retry(self, what: str, i: int) -> None:
        """A worker or request dies in the middle of an operation: its transaction never
        commits, so nothing of it may remain. Then the operation runs again (the redelivered
        task, the client's retry) and lands once."""
        self._step()
        try:
            operation = self._operation(what, i)
        except MarketError:
            # What the crash needs could not be set up (no funds, nothing was charged so there
            # is nothing to dispute or pay out): there is no operation to crash in.
            return
        if operation is None:
            return
        type(self).reached[f"crash in {what}"] += 1
        before = self._snapshot()
        try:
            with transaction.atomic():
                operation()
                raise Crash
        except Crash:
            pass
        except MarketError:
            return  # refused up front: nothing to crash in
        assert self._snapshot() == before, f"a crashed {what} left something behind"
        operation()
        operation_again = self._operation(what, i)
        if operation_again is not None and what in ("ack", "expire", "release", "lost_node"):
            before = self._snapshot()
            operation_again()  # a duplicate delivery after the effect landed: a no-op
            assert self._snapshot() == before, f"a repeated {what} moved money"

    def _operation(self, what: str, i: int):
        if what == "ack":
            return lambda: self._ack_all(self.now)
        if what == "expire":
            return lambda: expire_orders(now=self.now)
        if what == "lost_node":
            return lambda: end_orders_of_lost_nodes(now=self.now + timedelta(hours=8))
        if what == "release":
            return lambda: payments.release_due_earnings(now=self.now + timedelta(days=30))
        if what == "provision":
            order = self._order(i, ("pending",)) or self._placed()
            return (lambda: provision_order(order.pk)) if order else None
        if what == "stop":
            order = self._order(i, ("pending", "provisioning", "running")) or self._placed()
            return (lambda: stop_order(order)) if order else None
        # What the crashed operation needs is set up first when missing (and committed: only
        # the operation itself dies).
        if what == "resolve":
            dispute = Dispute.objects.filter(buyer=self.buyer, state="open").first()
            if dispute is None and (order := self._settled_order()) is not None:
                dispute = payments.open_dispute(order, self.buyer, "crash test")
            if dispute is None:
                return None
            return lambda: payments.resolve_dispute(dispute, refund=i, operator=self.operator)
        if what == "payout":
            payout = PayoutRequest.objects.filter(state="requested").first()
            if payout is None and self._settled_order() is not None:
                payments.release_due_earnings(now=self.now + timedelta(days=30))
                payout = payments.request_payout(self.provider, 1)
            if payout is None:
                return None
            return lambda: payments.mark_payout_paid(payout, operator=self.operator)
        raise AssertionError(what)

    def _settled_order(self) -> Order | None:
        """A freshly completed, charged order (its dispute window open), if funds allow."""
        order = self._placed()
        if order is None:
            return None
        provision_order(order.pk)
        self._ack_all(self.now - timedelta(minutes=30))
        stop_order(Order.objects.get(pk=order.pk))
        self._ack_all(self.now)
        order = Order.objects.get(pk=order.pk)
        charged = Settlement.objects.filter(order=order, captured__gt=0).exists()
        return order if order.state == "completed" and charged else None

    def _placed(self) -> Order | None:
        """A fresh pending order (committed before the crash under test), if funds allow."""
        try:
            order = place_order(
                self.buyer,
                listing_id=self.listing.pk,
                gpu_count=1,
                hours=1,
                wireguard_public_key=factories.wg_public_key(),
            )
        except MarketError:
            return None
        self.order_ids.append(order.pk)
        return order

    def _snapshot(self) -> tuple:
        return (
            tuple(Account.objects.order_by("pk").values_list("pk", "balance")),
            LedgerTransaction.objects.count(),
            tuple(Order.objects.order_by("pk").values_list("pk", "state")),
            Settlement.objects.count(),
            tuple(EarningsHold.objects.order_by("pk").values_list("pk", "state")),
            tuple(PayoutRequest.objects.order_by("pk").values_list("pk", "state")),
        )

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def money_adds_up_after_every_write(self) -> None:
        """The three checks below, after every step that wrote to the database. They read
        nothing but the database and `self.granted` (which only a write changes), so a step
        that wrote no row (a refusal, a no-op) leaves their answer as it was when they last
        passed. They were two thirds of the test's queries."""
        writes = _rows_written_so_far()
        if writes == self.checked_at_writes:
            return
        type(self).reached["invariants checked"] += 1
        self.the_ledger_audit_is_clean()
        self.orders_holds_settlements_and_logs_agree()
        self.every_party_holds_exactly_its_money()
        self.checked_at_writes = writes

    def the_ledger_audit_is_clean(self) -> None:
        assert audit_ledger() == []

    def orders_holds_settlements_and_logs_agree(self) -> None:
        """Two queries: every order with its hold, settlement and transition log; and the
        listing's GPUs are never oversold."""
        rows = list(
            Order.objects.values_list(
                "pk",
                "state",
                "hold__state",
                "settlement__id",
                "gpu_count",
                "listing_id",
                "cluster_id",
            )
        )
        orders = {pk: (state, hold_state, settled) for pk, state, hold_state, settled, *_ in rows}
        for listing in (self.listing, self.listing2):
            in_use = sum(r[4] for r in rows if r[1] in LIVE and r[5] == listing.pk)
            assert in_use <= listing.gpu_count
        # A multi-node order's one hold is open exactly while one of its parts lives.
        cluster_live: dict[int, bool] = {}
        for _, state, _, _, _, _, cluster_id in rows:
            if cluster_id is not None:
                cluster_live[cluster_id] = cluster_live.get(cluster_id, False) or state in LIVE
        cluster_holds = dict(
            EscrowHold.objects.filter(cluster__isnull=False).values_list("cluster_id", "state")
        )
        assert cluster_holds.keys() == cluster_live.keys()
        for cluster_id, live in cluster_live.items():
            assert (cluster_holds[cluster_id] == EscrowHold.State.OPEN) == live
        parts = {r[0] for r in rows if r[6] is not None}
        for pk, (state, hold_state, settled) in orders.items():
            if pk not in parts:
                assert (hold_state == EscrowHold.State.OPEN) == (state in LIVE), (state, hold_state)
            else:
                assert hold_state is None
            if state in Order.COMPLETED_STATES:
                assert settled is not None, state
            elif state != "failed":  # a failed order is settled when it had run
                assert settled is None, state
        logs: dict[int, list[tuple[str, str]]] = {}
        for order_id, from_state, to_state in OrderTransition.objects.order_by(
            "order_id", "pk"
        ).values_list("order_id", "from_state", "to_state"):
            logs.setdefault(order_id, []).append((from_state, to_state))
        assert logs.keys() == orders.keys()
        for order_id, log in logs.items():
            assert log[0] == ("", "pending")
            for (_, to_state), (from_state, _) in pairwise(log):
                assert from_state == to_state
            assert log[-1][1] == orders[order_id][0]

    def every_party_holds_exactly_its_money(self) -> None:
        """Buyer, provider, platform and the outside world, each from first principles (what
        was granted, captured, refunded, paid out), against the ledger's balances: four
        queries. The savepoint per example means the tables hold this example's rows only."""
        totals = Settlement.objects.aggregate(
            captured=Sum("captured"), fee=Sum("fee"), shares=Sum("provider_amount")
        )
        captured = totals["captured"] or 0
        refunds = list(
            Dispute.objects.filter(refund__isnull=False).values_list(
                "refund", "order__earnings_hold__amount"
            )
        )
        refunded = sum(refund for refund, _ in refunds)
        from_shares = sum(min(refund, share) for refund, share in refunds)
        paid_out = PayoutRequest.objects.filter(state="paid").aggregate(t=Sum("amount"))["t"] or 0
        balance: dict[tuple[str, int | None], int] = {}
        for kind, user_id, total in (
            Account.objects.values("kind", "user_id")
            .annotate(total=Sum("balance"))
            .values_list("kind", "user_id", "total")
        ):
            balance[(kind, user_id)] = total

        def of(kind: str, user=None) -> int:
            return balance.get((kind, user.pk if user else None), 0)

        wallet = of("wallet", self.buyer)
        assert wallet >= 0
        assert wallet == self.granted - of("escrow", self.buyer) - captured + refunded
        provider_money = (
            of("frozen", self.provider)
            + of("earnings", self.provider)
            + of("payout", self.provider)
            + paid_out
        )
        assert provider_money == (totals["shares"] or 0) - from_shares
        assert of("fees") == (totals["fee"] or 0) - (refunded - from_shares)
        assert of("world") == -self.granted + paid_out
        assert sum(balance.values()) == 0


def _rows_written_so_far() -> int:
    """Rows this connection has inserted, updated or deleted so far, in any table: a counter
    that every write moves (PostgreSQL counts the test's transaction, savepoints rolled back
    included; SQLite the connection's life)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)"
                " FROM pg_stat_xact_user_tables"
            )
        else:
            cursor.execute("SELECT total_changes()")
        return int(cursor.fetchone()[0])


def test_money_invariants_hold_under_any_sequence_of_operations(db, settings):
    # Faster beat-visible edges for small step counts: a window and a grace that the generated
    # time jumps (hours ahead) actually cross.
    settings.MOLT_DISPUTE_WINDOW_SECONDS = 48 * 3600
    settings.MOLT_BANDWIDTH_ALLOWANCE_GIB = 50
    users = get_user_model().objects
    # Unusable passwords: hashing one costs more than a whole example.
    buyer = users.create_user(username="prop-buyer", password=None)
    provider = users.create_user(username="prop-provider", password=None)
    operator = users.create_user(username="prop-operator", password=None, is_staff=True)
    node = factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(8)])
    listing = create_listing(
        provider, node=node, gpu_count=8, price_per_gpu_hour=1_500_000, price_per_gib=20_000
    )
    node2 = factories.enrolled_node(
        provider, gpus=[factories.gpu(i) for i in range(4)], region="us-east"
    )
    listing2 = create_listing(
        provider, node=node2, gpu_count=4, price_per_gpu_hour=2_700_000, price_per_gib=10_000
    )
    MoneyMachine.fixtures = {
        "buyer": buyer,
        "provider": provider,
        "operator": operator,
        "node": node,
        "listing": listing,
        "node2": node2,
        "listing2": listing2,
    }
    MoneyMachine.runs = []
    MoneyMachine.reached = Counter()
    # _min_steps: Hypothesis (pinned in pyproject) otherwise also tries some short runs, and
    # issue 4 asks for 200 examples of 30 steps or more. A failure still shrinks each step to
    # its simplest rule and arguments; it just keeps at least MIN_STEPS of them.
    run_state_machine_as_test(MoneyMachine, settings=settings_for_ci(), _min_steps=MIN_STEPS)
    # The run really was as big as issue 4 asks (a failure above would have stopped us first).
    full = [steps for steps in MoneyMachine.runs if steps >= MIN_STEPS]
    assert len(full) >= EXAMPLES, sorted(MoneyMachine.runs)
    # And it reached every money path, not only the easy ones.
    if EXAMPLES >= 100:
        paths = [
            "settled",
            "share released",
            "dispute resolved",
            "payout paid",
            "payout rejected",
            "reversal",
            "lost node",
            "allowance used up",
            "outage billed",
            "multi-node hold resolved",
            "multi-node part captured",
            "multi-node ended by loss",
            *(f"crash in {what}" for what in CRASHES),
        ]
        missing = [path for path in paths if not MoneyMachine.reached[path]]
        assert not missing, f"never reached: {missing} ({dict(MoneyMachine.reached)})"
    print("REACHED", dict(MoneyMachine.reached))


def settings_for_ci() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def test_the_write_counter_moves_on_every_write_and_on_nothing_else(db):
    """The state machine skips its checks while `_rows_written_so_far()` stands still: it must
    move on an insert, an update and a delete (in any table), and stand still on reads."""
    users = get_user_model().objects
    before = _rows_written_so_far()
    list(users.all())
    Account.objects.count()
    assert _rows_written_so_far() == before
    user = users.create_user(username="counted", password=None)
    after_insert = _rows_written_so_far()
    assert after_insert > before
    users.filter(pk=user.pk).update(first_name="Counted")
    after_update = _rows_written_so_far()
    assert after_update > after_insert
    users.filter(pk=user.pk).delete()
    assert _rows_written_so_far() > after_update
