"""Domain events of the market, for code that must follow them without being imported by
marketplace.orders (which would close an import circle: the Celery tasks call the orders
module, so the orders module cannot reach for the tasks).

Sent inside the writing transaction, as meshnet.signals are: a receiver's writes commit or
roll back with it, and anything it sends elsewhere it defers with transaction.on_commit.
"""

from django.dispatch import Signal

# kwargs: order (marketplace.models.Order, just created with its hold). marketplace.receivers
# enqueues its provisioning on commit.
order_placed = Signal()

# kwargs: order_id (int). Sent inside the writing transaction whenever what the order's buyer
# sees of it changes (every state transition, a re-key); frontend.realtime tells the order's
# open pages after commit.
order_changed = Signal()

# kwargs: cluster_id (int). A part of a multi-node order whose buyer chose on_part_loss="end"
# failed while other parts live: marketplace.receivers stops the others after commit.
cluster_part_lost = Signal()
