"""Desired states pushed to many agents as a few channel-layer messages (issue 14).

A message to a Channels group costs the receiving web process four Redis round trips, one
message after another on its one receiving connection (channels_redis: restore the backup,
BZPOPMIN, back it up, clean the backup): a change pushed to 1,000 agents as 1,000 group
messages took seconds to reach their sockets on a busy machine before any agent could ack.
So meshnet.tasks.push_desired_states sends one message per chunk of nodes, carrying each
node's signed state, to AGENTS_GROUP, which every web process with agents has joined once
(not each connection); the process hands each state to the connections of its node that it
holds, and ignores the others (another process holds them, or none does).

At most once, as every channel-layer message: a state lost here is re-pushed by the
lagging-nodes sweep, and an agent gets its full state on every connect.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from meshnet.gateway_key import key_certificates

log = logging.getLogger(__name__)

AGENTS_GROUP = "agents.desired-states"
# channels_redis forgets a group's member after its group_expiry (a day by default): the
# process's channel joins again well before that.
REJOIN_SECONDS = 3600


def states_message(
    states: dict[str, dict[str, Any]], names: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The group message for `states` (node id -> signed desired-state envelope) and, where
    given, each node's signed names table of the same revision (meshnet.names)."""
    message: dict[str, Any] = {"type": "desired.states", "states": states}
    if names:
        message["names"] = names
    return message


class Fanout:
    """One event loop's agent connections by node id, and the receiving end of AGENTS_GROUP
    for them: runs while the loop holds at least one authenticated agent connection."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.sockets: dict[str, set[Any]] = {}
        self._task: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()
        self.joined = asyncio.Event()  # the group is joined: pushes from now on arrive

    def join(self, node_id: str, socket: Any) -> None:
        """`socket` (an AgentConsumer, authenticated as `node_id`) gets the node's pushes."""
        self.sockets.setdefault(node_id, set()).add(socket)
        if self._task is None or self._task.done():
            self.joined.clear()
            self._task = asyncio.ensure_future(self._run())

    def leave(self, node_id: str, socket: Any) -> None:
        held = self.sockets.get(node_id)
        if held is not None:
            held.discard(socket)
            if not held:
                del self.sockets[node_id]
        if not self.sockets and self._task is not None:
            self._task.cancel()
            self._task = None

    def deliver(self, message: dict[str, Any]) -> int:
        """Hand each state of `message` to the connections of its node held here, each send a
        task of its own (an agent slow to read never holds up the others); returns how many.
        The gateway's key certificates go beside each state, read once for the message (a
        stat of their file per frame was a cost of a push to every agent)."""
        count = 0
        names = message.get("names") or {}
        certificates = None
        for node_id, envelope in (message.get("states") or {}).items():
            for socket in list(self.sockets.get(node_id, ())):
                if certificates is None:
                    certificates = key_certificates()
                send = asyncio.ensure_future(
                    self._send(socket, envelope, names.get(node_id), certificates)
                )
                self._sends.add(send)
                send.add_done_callback(self._sends.discard)
                count += 1
        return count

    @staticmethod
    async def _send(
        socket: Any,
        envelope: dict[str, Any],
        names: dict[str, Any] | None,
        certificates: list[dict[str, Any]],
    ) -> None:
        event: dict[str, Any] = {
            "type": "desired.state",
            "envelope": envelope,
            "key_certs": certificates,
        }
        if names is not None:
            event["names"] = names
        try:
            await socket.desired_state(event)
        except Exception:  # the socket closed meanwhile: it gets its state on reconnect
            log.debug("push to a closing agent connection dropped", exc_info=True)

    async def _run(self) -> None:
        # The default prefix: channels_redis receives every channel of a process through one
        # Redis key per prefix, one receiver at a time; a prefix of its own would wait its
        # turn behind the connections' blocking reads (seconds each).
        channel = await self.layer.new_channel()
        rejoin = asyncio.ensure_future(self._rejoin(channel))
        try:
            await self.joined.wait()
            while True:
                message = await self.layer.receive(channel)
                self.deliver(message)
        finally:
            rejoin.cancel()
            try:
                await self.layer.group_discard(AGENTS_GROUP, channel)
            except Exception:  # expires with the group anyway
                log.debug("could not leave %s", AGENTS_GROUP, exc_info=True)

    async def _rejoin(self, channel: str) -> None:
        while True:
            try:
                await self.layer.group_add(AGENTS_GROUP, channel)
                self.joined.set()
            except Exception:
                log.warning("could not join %s; retrying", AGENTS_GROUP, exc_info=True)
                await asyncio.sleep(5)
                continue
            await asyncio.sleep(REJOIN_SECONDS)


_fanouts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Fanout] = weakref.WeakKeyDictionary()


def fanout(layer: Any) -> Fanout:
    """The running event loop's Fanout (a web process has one loop; tests make many)."""
    loop = asyncio.get_running_loop()
    found = _fanouts.get(loop)
    if found is None or found.layer is not layer:
        found = _fanouts[loop] = Fanout(layer)
    return found
