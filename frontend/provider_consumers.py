"""The provider's live nodes page: /ws/provider/.

The session cookie authenticates (AuthMiddlewareStack and the origin check in config.routing).
The socket joins the group of the logged-in user's nodes, `owner.<user id>`, to which
frontend.realtime sends "node N changed" after the change commits. On every event
the session is read again (a logout or a password change ends the feed) and the node is checked
to still be this user's before the page hears of it. The page is told only which node changed;
it fetches the node's card through its own authorized view (frontend.provider_views.node_card).
"""

from __future__ import annotations

from importlib import import_module

from channels.auth import get_user
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from frontend.realtime import owner_group
from meshnet.models import Node

# Application close codes (4000-4999), so the page can tell "log in again" from a network drop.
CLOSE_NOT_LOGGED_IN = 4401


@database_sync_to_async
def _owned(user_id: int, node_pks: list[object]) -> list[int]:
    """Those of `node_pks` that are `user_id`'s nodes, in order (one query)."""
    pks = [pk for pk in node_pks if isinstance(pk, int) and not isinstance(pk, bool)]
    if not pks:
        return []
    owned = set(Node.objects.filter(pk__in=pks, owner_id=user_id).values_list("pk", flat=True))
    return [pk for pk in dict.fromkeys(pks) if pk in owned]


class ProviderConsumer(AsyncJsonWebsocketConsumer):
    user_id: int | None = None
    group: str = ""

    async def connect(self) -> None:
        # Accept first, then close with a code: a refused handshake reaches the page as a bare
        # 1006, which it could not tell from network trouble.
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_NOT_LOGGED_IN)
            return
        self.user_id = user.pk
        self.group = owner_group(user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        # After joining: the page re-reads its cards on this, so nothing committed between its
        # render and the join is missed.
        await self.send_json({"type": "subscribed"})

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = ""

    async def receive_json(self, content, **kwargs) -> None:
        """The page has nothing to say; whatever it sends is ignored."""

    async def _session_user_id(self) -> int | None:
        """Who the session belongs to now (a fresh read of the session store, not the user
        resolved at connect): None after a logout, a password change or a deactivation."""
        session = self.scope.get("session")
        key = getattr(session, "session_key", None)
        if not key:
            return None
        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=key)
        user = await get_user({"session": store})
        return user.pk if user.is_authenticated and user.is_active else None

    async def node_changed(self, event) -> None:
        """Group message from frontend.realtime.on_node_changed."""
        if self.user_id is None:
            return
        if await self._session_user_id() != self.user_id:
            await self.close(code=CLOSE_NOT_LOGGED_IN)
            return
        # One node ("node"), or several of one change that were announced together ("nodes").
        nodes = event.get("nodes")
        pks = nodes if isinstance(nodes, list) else [event.get("node")]
        change = event.get("change", "")
        for node_pk in await _owned(self.user_id, pks):
            await self.send_json({"type": "node", "node": node_pk, "change": change})
