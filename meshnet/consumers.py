"""The agent channel: one websocket per clawnode, authenticated by challenge-response.

Every frame after auth is checked against the node this connection proved it is; desired state
reaches the node's group from meshnet.tasks.push_desired_state and is sent as is (already
signed by the gateway key).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from clawnode import wire

from meshnet import agent_channel, nodes
from meshnet.agent_channel import AgentRefused, node_group
from meshnet.desired_state import signed_desired_state
from meshnet.models import Node

log = logging.getLogger(__name__)

AUTH_TIMEOUT_SECONDS = 10


class AgentConsumer(AsyncJsonWebsocketConsumer):
    node: Node | None = None
    challenge: str = ""
    _auth_timer: asyncio.Task | None = None

    async def connect(self) -> None:
        await self.accept()
        self.challenge = secrets.token_urlsafe(32)
        await self.send_json(
            {"type": "challenge", "challenge": self.challenge, "server_time": int(time.time())}
        )
        self._auth_timer = asyncio.ensure_future(self._close_if_not_authenticated())

    async def _close_if_not_authenticated(self) -> None:
        await asyncio.sleep(AUTH_TIMEOUT_SECONDS)
        if self.node is None:
            await self._refuse("no auth within the time limit", wire.CLOSE_AUTH_TIMEOUT)

    async def disconnect(self, code: int) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self.node is not None:
            await self.channel_layer.group_discard(node_group(self.node.node_id), self.channel_name)

    async def _refuse(self, detail: str, code: int) -> None:
        log.info("agent connection refused (%s): %s", code, detail)
        await self.send_json({"type": "error", "detail": detail})
        await self.close(code=code)

    def _peer_ip(self) -> str | None:
        client = self.scope.get("client")
        return client[0] if client else None

    @classmethod
    async def decode_json(cls, text_data):
        try:
            return json.loads(text_data)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            return None  # receive_json refuses it with a close code, not a crash

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
            # Re-check on every frame: a node revoked mid-connection is cut off.
            node = await database_sync_to_async(Node.objects.filter(pk=self.node.pk).first)()
            if node is None or node.revoked_at is not None:
                raise AgentRefused("node revoked", wire.CLOSE_FORBIDDEN)
            self.node = node
            if kind == "heartbeat":
                await database_sync_to_async(nodes.record_heartbeat)(node, self._peer_ip())
            elif kind == "inventory":
                await database_sync_to_async(nodes.update_inventory)(
                    node,
                    content.get("gpus") or [],
                    content.get("health") or [],
                    str(content.get("reason") or "")[:300],
                    images=content.get("images"),
                )
            elif kind == "report":
                await database_sync_to_async(agent_channel.record_report)(
                    node, content.get("detail")
                )
            elif kind == "metering":
                await database_sync_to_async(agent_channel.ingest_metering)(
                    node, content.get("envelope")
                )
            elif kind in ("ack", "removed", "sandbox_status"):
                # Heartbeat first: a silence that just ended is recorded as an outage before
                # the message can complete and settle an order (billing leaves outages out; a
                # sandbox that died ends its order, settled up to the report).
                await database_sync_to_async(nodes.record_heartbeat)(node, self._peer_ip())
                process = {
                    "ack": agent_channel.process_ack,
                    "removed": agent_channel.process_removed,
                    "sandbox_status": agent_channel.process_sandbox_status,
                }[kind]
                await database_sync_to_async(process)(node, content.get("envelope"))
            else:
                raise AgentRefused(f"unknown message type {kind!r}", wire.CLOSE_BAD_MESSAGE)
        except AgentRefused as exc:
            await self._refuse(str(exc), exc.close_code)
        except (wire.ProtocolError, ValueError, TypeError) as exc:
            await self._refuse(f"bad message: {exc}", wire.CLOSE_BAD_MESSAGE)

    async def _authenticate(self, envelope) -> None:
        node = await database_sync_to_async(agent_channel.authenticate_agent)(
            envelope if isinstance(envelope, dict) else {}, challenge=self.challenge
        )
        # A challenge answers once: a second auth frame on this connection is refused above.
        self.node = node
        self.challenge = ""
        await self.channel_layer.group_add(node_group(node.node_id), self.channel_name)
        await database_sync_to_async(nodes.record_heartbeat)(node, self._peer_ip())
        await self.send_json(
            {
                "type": "welcome",
                "node_id": node.node_id,
                "name": node.name,
                "mesh_address": node.mesh_address,
            }
        )
        envelope = await database_sync_to_async(signed_desired_state)(node)
        await self.send_json({"type": "desired_state", "envelope": envelope})

    async def node_revoked(self, event) -> None:
        """Group message from meshnet.nodes.revoke_node: close now rather than at the
        agent's next frame (which the per-frame check would refuse anyway)."""
        if self.node is not None:
            await self._refuse("node revoked", wire.CLOSE_FORBIDDEN)

    async def desired_state(self, event) -> None:
        """Group message from push_desired_state: forward the signed state to the agent."""
        if self.node is not None:
            await self.send_json({"type": "desired_state", "envelope": event["envelope"]})
