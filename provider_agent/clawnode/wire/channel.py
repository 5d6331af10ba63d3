"""The agent channel (websocket /ws/agent/): its frames and the close codes the gateway uses.

Frames are JSON objects with a "type". Gateway -> agent: "challenge" {challenge, server_time},
"welcome" {node_id, name, mesh_address}, "desired_state" {envelope: signed DESIRED_STATE},
"error" {detail}. Agent -> gateway: "auth" {envelope: signed AGENT_AUTH}, "heartbeat" {},
"inventory" {gpus, reason}, "ack" {envelope: signed ACK}, "metering" {envelope: signed METERING},
"removed" {envelope: signed REMOVED}.
"""

from __future__ import annotations

__all__ = ["CLOSE_AUTH_FAILED", "CLOSE_AUTH_TIMEOUT", "CLOSE_BAD_MESSAGE", "CLOSE_FORBIDDEN"]

# Close codes the gateway uses, so an agent can tell "retry later" from "give up".
CLOSE_BAD_MESSAGE = 4400
CLOSE_AUTH_FAILED = 4401
CLOSE_FORBIDDEN = 4403  # unknown or revoked node: re-enrol
CLOSE_AUTH_TIMEOUT = 4408
