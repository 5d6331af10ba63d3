"""The browser channel: an order page's websocket, /ws/orders/<id>/.

The session cookie authenticates the user (AuthMiddlewareStack in config.routing; the origin is
checked there too, so another site cannot open this socket with the buyer's cookie). Only the
order's buyer may listen: checked on connect and again on every event, re-reading the session
each time, so a logout, a password change or a lost order ends the feed. The page never sends
anything that matters; everything sent is a snapshot re-read from the database (see
frontend.order_state.snapshot), so a missed event is repaired by the next one or a reconnect.
"""

from __future__ import annotations

import time
from importlib import import_module

from channels.auth import get_user
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from frontend.order_state import order_for, snapshot
from frontend.realtime import order_group

# Application close codes (4000-4999), so the page can say why it stopped listening.
CLOSE_NOT_LOGGED_IN = 4401
CLOSE_NOT_FOUND = 4404
REFRESH_INTERVAL_SECONDS = 2.0


@database_sync_to_async
def _snapshot_for(user, order_id: int) -> dict | None:
    order = order_for(user, order_id)
    return snapshot(order) if order is not None else None


class OrderConsumer(AsyncJsonWebsocketConsumer):
    order_id: int = 0
    joined: bool = False
    last_refresh: float = float("-inf")

    async def connect(self) -> None:
        self.order_id = int(self.scope["url_route"]["kwargs"]["order_id"])
        # Accept first, then close with a code: a refused handshake reaches the page as a bare
        # 1006 and it could not tell "log in again" from "network trouble".
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_NOT_LOGGED_IN)
            return
        # Join before reading, so a change committed in between is not missed.
        await self.channel_layer.group_add(order_group(self.order_id), self.channel_name)
        self.joined = True
        state = await _snapshot_for(user, self.order_id)
        if state is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.send_json(state)

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.channel_layer.group_discard(order_group(self.order_id), self.channel_name)
            self.joined = False

    async def receive_json(self, content, **kwargs) -> None:
        # The page may ask for a fresh snapshot (after it woke up), at most every few seconds so
        # a page cannot turn the socket into a query loop; anything else is ignored.
        if isinstance(content, dict) and content.get("type") == "refresh":
            now = time.monotonic()
            if now - self.last_refresh >= REFRESH_INTERVAL_SECONDS:
                self.last_refresh = now
                await self.order_changed({"order": self.order_id})

    async def _current_user(self):
        """The session's user now, not at connect time: a fresh read of the session store."""
        session = self.scope.get("session")
        key = getattr(session, "session_key", None)
        if not key:
            return None
        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=key)
        user = await get_user({"session": store})
        return user if user.is_authenticated else None

    async def order_changed(self, event) -> None:
        """Group message from frontend.realtime.announce_order."""
        user = await self._current_user()
        if user is None:
            await self.close(code=CLOSE_NOT_LOGGED_IN)
            return
        state = await _snapshot_for(user, self.order_id)
        if state is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.send_json(state)
