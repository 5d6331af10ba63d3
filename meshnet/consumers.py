"""The agent channel: one websocket per clawnode, authenticated by challenge-response.

Every frame after auth is checked against the node this connection proved it is; desired state
reaches the node's group from meshnet.tasks.push_desired_state and is sent as is (already
signed by the gateway key).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from clawnode import wire

from meshnet import acks, agent_channel, agent_guard, connectivity, liveness, nodes, round_trips
from meshnet.agent_channel import AgentRefused, node_group, signed_refusal
from meshnet.desired_state import signed_desired_states
from meshnet.fanout import fanout
from meshnet.gateway_key import key_certificates
from meshnet.models import Node
from meshnet.names import signed_names_of

log = logging.getLogger(__name__)

AUTH_TIMEOUT_SECONDS = 10


# The database work of agents' frames runs on a few threads, not on the one thread that
# database_sync_to_async(thread_sensitive) gives all of a process's consumers: one agent's ack
# never queues behind another's metering. A connection's frames still run one at a time, in
# order (each is awaited). Each thread keeps its own persistent connection (CONN_MAX_AGE).
AGENT_DB_THREADS = 4
_agent_db_executor = ThreadPoolExecutor(
    max_workers=AGENT_DB_THREADS, thread_name_prefix="molt-agent-db"
)


def agent_db(func):
    """database_sync_to_async on the agents' database threads."""
    return database_sync_to_async(func, thread_sensitive=False, executor=_agent_db_executor)


class AgentConsumer(AsyncJsonWebsocketConsumer):
    node: Node | None = None
    challenge: str = ""
    session_challenge: str = ""
    _auth_timer: asyncio.Task | None = None
    # Frame limits, per-address caps and per-node rates (meshnet.agent_guard).
    guard: agent_guard.ConnectionGuard | None = None
    _closing = False

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # however the socket ended (disconnect() is not called after an exception)
            if self.guard is not None:
                self.guard.release()
            if self.node is not None:
                fanout(self.channel_layer).leave(self.node.node_id, self)

    async def dispatch(self, message) -> None:
        # Channels' dispatch closes stale database connections before every message, a hop to
        # a worker thread; every query here goes through database_sync_to_async, which does
        # that in its own thread already. Under a connection flood the hop was a quarter of
        # the web process's time (benchmarks/agent_hostile.py).
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.guard = agent_guard.ConnectionGuard(agent_guard.scope_address(self.scope))
        await self.accept()
        try:
            self.guard.admit()
        except AgentRefused as exc:
            # Not through _refuse: a flood of these is logged once a minute, not each.
            await self.send_json({"type": "error", "detail": str(exc)})
            await self.close(code=exc.close_code)
            return
        self.challenge = secrets.token_urlsafe(32)
        # Kept after auth (self.challenge is cleared): a signed refusal names it.
        self.session_challenge = self.challenge
        await self.send_json(
            {"type": "challenge", "challenge": self.challenge, "server_time": int(time.time())}
        )
        self._auth_timer = asyncio.ensure_future(self._close_if_not_authenticated())

    async def _close_if_not_authenticated(self) -> None:
        await asyncio.sleep(AUTH_TIMEOUT_SECONDS)
        if self.node is None:
            await self._refuse("no auth within the time limit", wire.CLOSE_AUTH_TIMEOUT)

    async def disconnect(self, code: int) -> None:
        if self.guard is not None:
            self.guard.release()
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self.node is not None:
            await self.channel_layer.group_discard(node_group(self.node.node_id), self.channel_name)
            fanout(self.channel_layer).leave(self.node.node_id, self)
            # Nothing heard is lost on a clean close (a shutdown closes every connection).
            batcher = liveness.batcher()
            batcher.leave(self.node, self)
            await batcher.flush()

    async def _refuse(self, detail: str, code: int, node_id: str = "") -> None:
        log.info("agent connection refused (%s): %s", code, detail)
        node_id = node_id or (self.node.node_id if self.node is not None else "")
        if code == wire.CLOSE_FORBIDDEN and node_id and self.session_challenge:
            # The agent stops for good only on this signed word, bound to this connection's
            # challenge; a bare 4403 (which anyone on the path can send) only delays it.
            envelope = signed_refusal(node_id, self.session_challenge, detail)
            if envelope is not None:
                await self.send_json({"type": "refused", "envelope": envelope})
        await self.send_json({"type": "error", "detail": detail})
        await self.close(code=code)

    def _peer_ip(self) -> str | None:
        client = self.scope.get("client")
        return client[0] if client else None

    async def close(self, code=None, reason=None) -> None:
        self._closing = True  # frames already queued behind the close are not handled
        await super().close(code=code, reason=reason)

    async def websocket_receive(self, message) -> None:
        """Every frame passes the guard first: size on the raw text (before parsing), binary,
        JSON depth, per-node rates; only then is it handled (receive_json)."""
        if self._closing or self.guard is None:
            return
        try:
            content = self.guard.frame(message)
        except AgentRefused as exc:
            await self._refuse(str(exc), exc.close_code)
            return
        if content is None:
            return  # over its rate, dropped
        await self.receive_json(content)
        if self.node is not None and not self.guard.node_id:
            self.guard.authenticated(self.node.node_id)

    async def receive_json(self, content, **kwargs) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        try:
            if kind is None:
                raise AgentRefused(
                    "frames must be JSON objects with a type", wire.CLOSE_BAD_MESSAGE
                )
            if self.node is None:
                if kind != "auth":
                    raise AgentRefused("authenticate first", wire.CLOSE_AUTH_FAILED)
                await self._authenticate(content.get("envelope"))
                return
            node = self.node
            # Revocation reaches this connection as the group message node_revoked (closing it
            # at once); as that message may be lost, heartbeats (every flush) and metering
            # (under the node's lock) see it in the rows they read anyway, and the rarer frames
            # below re-read the node in the same thread hop as their work.
            if kind == "heartbeat":
                # No database work here: written in a batch (meshnet.liveness).
                liveness.batcher().beat(node, self._peer_ip())
            elif kind == "metering":
                # Verified here (no database work); only a sample that names peers has
                # anything to store or bill (agent_channel.check_metering).
                envelope = content.get("envelope")
                sample = agent_channel.check_metering(node, envelope)
                if sample.peers:
                    await agent_db(agent_channel.record_metering)(node, envelope, sample)
            elif kind in ("inventory", "report", "connectivity", "round_trips"):
                await agent_db(_node_message)(node, kind, content, None)
            elif kind in ("ack", "removed", "sandbox_status"):
                # Heartbeat first: a silence that just ended is recorded as an outage before
                # the message can complete and settle an order (billing leaves outages out; a
                # sandbox that died ends its order, settled up to the report). The node's
                # batched heartbeats are written with it (meshnet.liveness.settle_pending).
                batcher = liveness.batcher()
                beat = batcher.before_settling(node, self._peer_ip())
                if kind == "ack":
                    # Recorded with other agents' acks, on a thread of their own (meshnet.acks).
                    pending = acks.PendingAck(node, content.get("envelope"), beat)
                    await acks.batcher().record(pending)
                else:
                    await agent_db(_node_message)(node, kind, content, beat)
                if beat is not None:
                    batcher.settled(node, beat)
            else:
                raise AgentRefused(f"unknown message type {kind!r}", wire.CLOSE_BAD_MESSAGE)
        except AgentRefused as exc:
            await self._refuse(str(exc), exc.close_code)
        except (wire.ProtocolError, ValueError, TypeError) as exc:
            await self._refuse(f"bad message: {exc}", wire.CLOSE_BAD_MESSAGE)

    async def _authenticate(self, envelope) -> None:
        try:
            node = await agent_db(agent_channel.authenticate_agent)(
                envelope if isinstance(envelope, dict) else {}, challenge=self.challenge
            )
        except AgentRefused as exc:
            if exc.close_code != wire.CLOSE_FORBIDDEN:
                raise
            # Unknown or revoked: the refusal is signed for the node id the agent claimed (it
            # checks the id is its own and the challenge this connection's).
            body = envelope.get("body") if isinstance(envelope, dict) else None
            claimed = body.get("node_id") if isinstance(body, dict) else None
            claimed = claimed if isinstance(claimed, str) and len(claimed) <= 64 else ""
            await self._refuse(str(exc), exc.close_code, node_id=claimed)
            return
        # A challenge answers once: a second auth frame on this connection is refused above.
        self.node = node
        self.challenge = ""
        await self.channel_layer.group_add(node_group(node.node_id), self.channel_name)
        # The connect counts as a heartbeat, written with the next batch (or before this
        # node's next ack: meshnet.liveness).
        batcher = liveness.batcher()
        batcher.join(node, self)
        batcher.beat(node, self._peer_ip())
        await self.send_json(
            {
                "type": "welcome",
                "node_id": node.node_id,
                "name": node.name,
                "mesh_address": node.mesh_address,
                # The optional frames this gateway takes (an agent sends one only if named).
                "accepts": list(connectivity.ACCEPTS),
            }
        )
        # Pushes to many nodes come as one message per process (meshnet.fanout): joined
        # before the state is read, so none committed after the read is missed.
        pushes = fanout(self.channel_layer)
        pushes.join(node.node_id, self)
        try:
            await asyncio.wait_for(pushes.joined.wait(), AUTH_TIMEOUT_SECONDS)
        except TimeoutError:  # Redis is down: the full state below, re-pushes once it is back
            log.warning("agent pushes not joined yet; %s gets its state on connect", node)
        envelope, names = await connect_states().read(node)
        await self.send_json({**desired_state_frame(envelope), "names": names})

    async def node_revoked(self, event) -> None:
        """Group message from meshnet.nodes.revoke_node: close now rather than at the
        agent's next frame (which the per-frame check would refuse anyway)."""
        if self.node is not None:
            await self._refuse("node revoked", wire.CLOSE_FORBIDDEN)

    async def desired_state(self, event) -> None:
        """A state from meshnet.fanout (or the node's group, where a worker of the previous
        release sends it): forward the signed state to the agent."""
        if self.node is not None:
            # The fanout reads the key certificates once per push; a node group's message
            # (a previous release's worker) has none, and they are read here.
            frame = desired_state_frame(event["envelope"], event.get("key_certs"))
            if "names" in event:  # the names table of the same revision (meshnet.names)
                frame["names"] = event["names"]
            await self.send_json(frame)


def _signed_states(nodes: list[Node]) -> dict[int, tuple[dict, dict]]:
    """Each node's signed desired state and names table (meshnet.names), read together: by
    pk, in the same few queries whatever the number of nodes."""
    states, names = signed_desired_states(nodes), signed_names_of(nodes)
    return {node.pk: (states[node.pk], names[node.pk]) for node in nodes}


# Nodes whose states one read takes at most.
MAX_STATE_READ = 200


class ConnectStates:
    """The states of the agents that just authenticated on one event loop, read in batches.

    A gateway restart brings every agent back at once, and each one's state on connect was a
    thread hop and five queries of its own: the largest share of the web process's time in a
    connect wave (py-spy, benchmarks/agent_plane.py). Group commit, as meshnet.acks: a lone
    connect is read at once, those that arrive meanwhile together next."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Node, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def read(self, node: Node) -> tuple[dict, dict]:
        """`node`'s signed desired state and names table; raises what reading them raised."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((node, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        return await future

    async def _run(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting[:MAX_STATE_READ], self.waiting[MAX_STATE_READ:]
            nodes = list({node.pk: node for node, _ in batch}.values())
            try:
                states: dict | Exception = await agent_db(_signed_states)(nodes)
            except Exception as exc:  # each connection raises it, as it would alone
                states = exc
            for node, future in batch:
                if future.done():  # its connection went away meanwhile
                    continue
                if isinstance(states, Exception):
                    future.set_exception(states)
                else:
                    future.set_result(states[node.pk])


_connect_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ConnectStates] = (
    weakref.WeakKeyDictionary()
)


def connect_states() -> ConnectStates:
    """The running event loop's ConnectStates (a web process has one loop; tests make many)."""
    loop = asyncio.get_running_loop()
    found = _connect_states.get(loop)
    if found is None:
        found = _connect_states[loop] = ConnectStates()
    return found


def desired_state_frame(envelope: dict, certificates: list[dict] | None = None) -> dict:
    """A desired state for the agent, with the gateway's key certificates once its key was
    rotated: an agent that pinned an older key follows them to the key that signed this
    (clawnode.wire.keycert). Read for each push (cached while the file is unchanged; None:
    read now), so a rotation reaches connected agents with the next state."""
    frame = {"type": "desired_state", "envelope": envelope}
    if certificates is None:
        certificates = key_certificates()
    if certificates:
        frame["key_certs"] = certificates
    return frame


def _node_message(node: Node, kind: str, content: dict, beat: liveness.Beat | None) -> None:
    """The database work of one of the rarer frames, in one thread hop: re-read the node
    (refused if revoked meanwhile), write the heartbeats `beat` carries first, then the
    message. The connection's copy of the node is not refreshed: what these functions use of
    it (pk, node_id, keys, owner) does not change. An inventory's own read of the node makes
    the check (meshnet.nodes.update_inventory): a query less for the most frequent of these."""
    if kind != "inventory":
        revoked_at = list(Node.objects.filter(pk=node.pk).values_list("revoked_at", flat=True))
        if revoked_at != [None]:  # gone, or revoked
            raise AgentRefused("node revoked", wire.CLOSE_FORBIDDEN)
    if beat is not None:
        liveness.settle_pending(beat)
    if kind == "inventory":
        nodes.update_inventory(
            node,
            content.get("gpus") or [],
            content.get("health") or [],
            str(content.get("reason") or "")[:300],
            images=content.get("images"),
            names=content.get("names"),
        )
    elif kind == "report":
        agent_channel.record_report(node, content.get("detail"))
    elif kind == "connectivity":
        try:
            connectivity.record_connectivity(node, content.get("envelope"))
        except connectivity.ConnectivityRefused as exc:
            raise AgentRefused(str(exc), wire.CLOSE_BAD_MESSAGE) from None
    elif kind == "round_trips":
        try:
            round_trips.record_round_trips(node, content.get("envelope"))
        except round_trips.RoundTripsRefused as exc:
            raise AgentRefused(str(exc), wire.CLOSE_BAD_MESSAGE) from None
    else:
        process = {
            "ack": agent_channel.process_ack,
            "removed": agent_channel.process_removed,
            "sandbox_status": agent_channel.process_sandbox_status,
        }[kind]
        process(node, content.get("envelope"))
