"""A Hypothesis state machine over the money paths: grants, orders, provisioning, the agent's
acks, stops, cancels, expiry, metering and settlement retries, in any order and at any times.
After every step the ledger audit must be clean and the orders must agree with their holds.

It runs inside one pytest-django test (one transaction, rolled back at the end), so rows from
earlier examples stay: each example makes its own users, node and listing under fresh names,
and every check either is global (the audit) or looks at this example's buyer only.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from itertools import pairwise

import pytest
from django.contrib.auth import get_user_model
from django.db.models import Sum
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

from marketplace import ledger, services
from marketplace.audit import audit_ledger
from marketplace.errors import AlreadyResolved, InsufficientFunds, InvalidTransition, Oversold
from marketplace.models import EscrowHold, Order, OrderTransition, Settlement
from meshnet import services as mesh
from tests import factories

pytestmark = [pytest.mark.property, pytest.mark.db, pytest.mark.django_db]

USD = 1_000_000
LIVE = {"pending", "provisioning", "running", "stopping"}

order_index = st.integers(min_value=0, max_value=1_000)


class MoneyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        tag = uuid.uuid4().hex[:10]
        users = get_user_model().objects
        self.buyer = users.create_user(username=f"buyer-{tag}", password="x-pass-123")
        self.provider = users.create_user(username=f"provider-{tag}", password="x-pass-123")
        self.node = factories.enrolled_node(
            self.provider, gpus=[factories.gpu(i) for i in range(4)]
        )
        self.listing = services.create_listing(
            self.provider,
            node=self.node,
            gpu_count=4,
            price_per_gpu_hour=1_500_000,
            price_per_gib=20_000,
        )
        self.order_ids: list[int] = []
        self.granted = 0
        self.grant(100 * USD)  # enough for a few orders, so examples get past the wallet

    def _order(self, i: int, states: tuple[str, ...] = ()) -> Order | None:
        """The i-th (modulo) of this example's orders, among those in `states` if given."""
        orders = Order.objects.filter(pk__in=self.order_ids).order_by("pk")
        if states:
            orders = orders.filter(state__in=states)
        found = list(orders)
        return found[i % len(found)] if found else None

    # --- rules ---------------------------------------------------------------------------

    @rule(amount=st.integers(min_value=1, max_value=40 * USD))
    def grant(self, amount: int) -> None:
        ledger.grant_credits(self.buyer, amount)
        self.granted += amount

    @rule(gpu_count=st.integers(min_value=1, max_value=3), hours=st.integers(1, 6))
    def place_order(self, gpu_count: int, hours: int) -> None:
        try:
            order = services.place_order(
                self.buyer,
                listing_id=self.listing.pk,
                gpu_count=gpu_count,
                hours=hours,
                wireguard_public_key=factories.wg_public_key(),
            )
        except (InsufficientFunds, Oversold):
            return
        self.order_ids.append(order.pk)

    def _ack_all(self, at) -> None:
        self.node.refresh_from_db()
        mesh.acknowledge_revision(self.node, self.node.desired_revision, at=at)

    @precondition(lambda self: self.order_ids)
    @rule(i=order_index, agent_answers=st.booleans(), minutes_ago=st.integers(0, 8 * 60))
    def provision(self, i: int, agent_answers: bool, minutes_ago: int) -> None:
        """The provisioning task ran (again, for a retried message); the agent may apply the
        new peer at once, as it usually does."""
        order = self._order(i, ("pending",)) or self._order(i)
        services.provision_order(order.pk)
        if agent_answers:
            self._ack_all(timezone.now() - timedelta(minutes=minutes_ago))

    @rule(back=st.integers(min_value=0, max_value=3), minutes_ago=st.integers(0, 8 * 60))
    def agent_acks(self, back: int, minutes_ago: int) -> None:
        """The agent applied some revision (the latest, or an older one arriving late, or a
        repeat), which starts billing for added peers and completes (and settles) orders whose
        peer it removed."""
        self.node.refresh_from_db()
        revision = max(self.node.desired_revision - back, 0)
        mesh.acknowledge_revision(
            self.node, revision, at=timezone.now() - timedelta(minutes=minutes_ago)
        )

    @precondition(lambda self: self.order_ids)
    @rule(i=order_index, agent_answers=st.booleans())
    def stop_or_cancel(self, i: int, agent_answers: bool) -> None:
        """The buyer stops a live order (a cancel before it runs) or, now and then, one that
        already ended (refused). The agent may then acknowledge the peer's removal at once."""
        order = self._order(i, ("pending", "provisioning", "running")) or self._order(i)
        try:
            services.stop_order(order)
        except InvalidTransition:
            assert order.state not in ("pending", "provisioning", "running")
        else:
            expected = "stopping" if order.state == "running" else "cancelled"
            assert Order.objects.get(pk=order.pk).state == expected
        if agent_answers:
            self._ack_all(timezone.now())

    @rule(ahead_minutes=st.integers(min_value=0, max_value=8 * 60), agent_answers=st.booleans())
    def expire(self, ahead_minutes: int, agent_answers: bool) -> None:
        """The beat task runs, maybe late: booked time up -> stopping, provisioning past its
        timeout -> failed. The agent may then acknowledge the removals."""
        services.expire_orders(now=timezone.now() + timedelta(minutes=ahead_minutes))
        if agent_answers:
            self._ack_all(timezone.now())

    @precondition(lambda self: self.order_ids)
    @rule(i=order_index, rx=st.integers(0, 20 << 30), tx=st.integers(0, 20 << 30))
    def traffic(self, i: int, rx: int, tx: int) -> None:
        order = self._order(i, ("running", "stopping"))
        if order is not None:
            services.add_traffic(order.job_peer, rx_bytes=rx, tx_bytes=tx)

    @precondition(lambda self: self.order_ids)
    @rule(i=order_index)
    def settle_again(self, i: int) -> None:
        """A retried settlement (the sweep, a redelivered task) never settles twice, and an
        order that is not ready for settlement is refused without moving money."""
        order = self._order(i, ("completed",)) or self._order(i)
        before = Settlement.objects.filter(order=order).values_list("pk", flat=True).first()
        try:
            settlement = services.settle_order(order)
        except (InvalidTransition, AlreadyResolved):
            assert before is None
            return
        assert before is None or settlement.pk == before

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def the_ledger_audit_is_clean(self) -> None:
        assert audit_ledger() == []

    @invariant()
    def orders_agree_with_their_holds(self) -> None:
        for order in Order.objects.filter(buyer=self.buyer).select_related("hold"):
            if order.state in LIVE:
                assert order.hold.state == EscrowHold.State.OPEN, order
            else:
                assert order.hold.state != EscrowHold.State.OPEN, order
            has_settlement = Settlement.objects.filter(order=order).exists()
            assert has_settlement == (order.state == "completed"), order

    @invariant()
    def the_wallet_is_grants_less_holds_less_captures(self) -> None:
        open_holds = ledger.held_for(self.buyer)
        captured = (
            Settlement.objects.filter(order__buyer=self.buyer).aggregate(t=Sum("captured"))["t"]
            or 0
        )
        assert ledger.available_for(self.buyer) == self.granted - open_holds - captured
        assert ledger.available_for(self.buyer) >= 0

    @invariant()
    def every_order_has_a_chained_transition_log(self) -> None:
        for order in Order.objects.filter(buyer=self.buyer):
            log = list(
                OrderTransition.objects.filter(order=order).values_list("from_state", "to_state")
            )
            assert log[0] == ("", "pending")
            for (_, to_state), (from_state, _) in pairwise(log):
                assert from_state == to_state
            assert log[-1][1] == order.state

    @invariant()
    def gpus_are_never_oversold(self) -> None:
        assert Order.objects.gpus_in_use(self.listing.pk) <= self.listing.gpu_count


def test_money_invariants_hold_under_any_sequence_of_operations(db):
    run_state_machine_as_test(
        MoneyMachine,
        settings=settings(
            # Cheap by default (it runs on both databases in every `make test`); set
            # MOLT_PROPERTY_EXAMPLES=500 for a longer hunt.
            max_examples=int(os.environ.get("MOLT_PROPERTY_EXAMPLES", "30")),
            stateful_step_count=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
