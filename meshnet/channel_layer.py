"""The one way the gateway sends to a Channels group from a write path: after commit.

meshnet uses it for its own channel to an agent (meshnet.nodes: `node.revoked` to the node's
group); frontend.realtime uses it for the browser pages. It lives here, in the lowest app, so
that both reach it without meshnet importing anything above it.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)


def group_send_on_commit(group: str, message: dict[str, Any]) -> None:
    """Send `message` to `group` after the current transaction commits (a rolled back change is
    never announced), at most once (the channel layer may drop it), and never failing the write
    that already committed: whoever misses a message catches up from the database (a page on
    reload, an agent on reconnect)."""

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:
            log.warning("could not send %s to group %s", message.get("type"), group, exc_info=True)

    transaction.on_commit(send, robust=True)
