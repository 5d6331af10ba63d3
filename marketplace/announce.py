"""Telling an order's open browser pages that it changed (frontend.consumers.OrderConsumer).

Kept apart from the lifecycle so that one later step can move every realtime send into the
frontend, driven by domain signals, without touching the write paths' rules.
"""

from __future__ import annotations

import logging

from django.db import transaction

log = logging.getLogger(__name__)


def order_group(order_id: int) -> str:
    """The Channels group the order's browser pages join (frontend.consumers.OrderConsumer)."""
    return f"order.{order_id}"


def announce_order(order_id: int) -> None:
    """After commit, tell the order's open pages that it changed. The message carries only the
    id: each page's consumer re-reads the order and re-checks its owner before sending anything.
    At most once (the channel layer may drop it); a page that reconnects gets the full state."""

    def send() -> None:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(
                order_group(order_id), {"type": "order.changed", "order": order_id}
            )
        except Exception:
            # A page that misses this still shows the truth on its next reconnect or reload;
            # the transition that already committed must not look failed to its caller.
            log.warning("could not announce order %s to its pages", order_id, exc_info=True)

    transaction.on_commit(send, robust=True)
