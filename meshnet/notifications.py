"""Messages from meshnet's write paths to Channels groups, sent after commit: the owner's open
pages (owner_group, notify_owner) and, for a revocation, the node's agent connection."""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from meshnet.models import Node

log = logging.getLogger(__name__)


def owner_group(user_id: int) -> str:
    """The Channels group of one provider's open pages (frontend.provider_consumers)."""
    return f"owner.{user_id}"


def group_send_on_commit(group: str, message: dict[str, Any]) -> None:
    """The one way meshnet talks to Channels groups from a write path: after commit (a rolled
    back change is never announced), at most once (the channel layer may drop it), and never
    failing the write that already committed: whoever misses a message catches up from the
    database (a page on reload, an agent on reconnect)."""

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:
            log.warning("could not send %s to group %s", message.get("type"), group, exc_info=True)

    transaction.on_commit(send, robust=True)


def notify_owner(node: Node, change: str) -> None:
    """Tell `node`'s owner's open pages that the node changed (`change`: enrolled, online,
    inventory, revoked). The message names the node only: the page's consumer re-checks who is
    logged in and the page fetches what it shows through its own authorized view."""
    group_send_on_commit(
        owner_group(node.owner_id), {"type": "node.changed", "node": node.pk, "change": change}
    )
