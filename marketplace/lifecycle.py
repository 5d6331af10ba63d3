"""The order's state machine: which transitions exist, and the one way to make one.

Every state change of an order, wherever it is decided (orders, settlement of a lost node,
payments' disputes), goes through `transition`: a compare-and-set on the current state plus a
row in the transition log with why, in the caller's transaction (design/money.md, "Job
lifecycle"). A lost race changes nothing and returns False; a transition the table does not
allow raises InvalidTransition before anything is written.
"""

from __future__ import annotations

from types import MappingProxyType

from marketplace.errors import InvalidTransition
from marketplace.models import Order, OrderTransition
from marketplace.signals import order_changed

S = Order.State

# from-state -> the states it may move to. "" is "no order yet": placing one is the only way in.
# stopping -> failed is not drawn in money.md: it is a node revoked while the job was being
# removed (fail_order), where nothing the provider ran is billed.
ALLOWED = MappingProxyType(
    {
        "": frozenset({S.PENDING}),
        S.PENDING: frozenset({S.PROVISIONING, S.CANCELLED, S.FAILED}),
        S.PROVISIONING: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
        S.RUNNING: frozenset({S.STOPPING, S.FAILED}),
        S.STOPPING: frozenset({S.COMPLETED, S.FAILED}),
        # A settled order the buyer was charged for may be disputed within its window.
        S.COMPLETED: frozenset({S.DISPUTED}),
        S.FAILED: frozenset({S.DISPUTED}),
        S.DISPUTED: frozenset({S.RESOLVED}),
        S.CANCELLED: frozenset(),
        S.RESOLVED: frozenset(),
    }
)


def check_allowed(from_state: str, to_state: str) -> None:
    """Raise InvalidTransition unless the table allows `from_state` -> `to_state`."""
    if to_state not in ALLOWED.get(from_state, frozenset()):
        raise InvalidTransition(f"an order cannot go from {from_state or '(none)'} to {to_state}")


def record_placed(order: Order) -> None:
    """The first log row of a just-created order ("" -> pending); no compare-and-set, since
    the row was created in this very transaction."""
    check_allowed("", S.PENDING)
    OrderTransition.objects.create(
        order=order, from_state="", to_state=S.PENDING, reason="order placed"
    )


def transition(order: Order, from_state: str, to_state: str, why: str, **fields) -> bool:
    """Compare-and-set the order's state from `from_state` to `to_state` plus a log row saying
    `why`, then send order_changed (frontend.realtime tells the order's pages on commit).
    `fields` are other Order columns to set in the same update (`reason=` among them, so the
    log's reason is `why`).

    Raises InvalidTransition (nothing written) for a transition the table does not allow.
    Returns False (nothing written) when the order is no longer in `from_state`: someone else
    won the race. Locks: the order row, for the update; call inside the caller's transaction,
    after the locks it takes first (node -> keys -> order). `order` is refreshed on success."""
    check_allowed(from_state, to_state)
    changed = Order.objects.filter(pk=order.pk, state=from_state).update(state=to_state, **fields)
    if not changed:
        return False
    OrderTransition.objects.create(
        order=order, from_state=from_state, to_state=to_state, reason=why[:200]
    )
    order_changed.send(sender=Order, order_id=order.pk)
    order.refresh_from_db()
    return True
