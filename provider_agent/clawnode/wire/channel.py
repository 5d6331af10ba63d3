"""The agent channel (websocket /ws/agent/): its frames and the close codes the gateway uses.

Frames are JSON objects with a "type". Gateway -> agent: "challenge" {challenge, server_time},
"welcome" {node_id, name, mesh_address}, "desired_state" {envelope: signed DESIRED_STATE,
names: signed NAMES (optional)}, "error" {detail}. Agent -> gateway: "auth" {envelope: signed
AGENT_AUTH}, "heartbeat" {}, "inventory" {gpus, reason, images, names}, "ack" {envelope:
signed ACK}, "metering" {envelope: signed METERING}, "removed" {envelope: signed REMOVED}.
"""

from __future__ import annotations

__all__ = [
    "CLOSE_AUTH_FAILED",
    "CLOSE_AUTH_TIMEOUT",
    "CLOSE_BAD_MESSAGE",
    "CLOSE_FORBIDDEN",
    "CLOSE_RATE_LIMITED",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_LATER",
]

# Close codes the gateway uses, so an agent can tell "retry later" from "give up".
CLOSE_BAD_MESSAGE = 4400
CLOSE_AUTH_FAILED = 4401
CLOSE_FORBIDDEN = 4403  # unknown or revoked node: re-enrol
CLOSE_AUTH_TIMEOUT = 4408
CLOSE_RATE_LIMITED = 4429  # frames of one kind faster than the gateway takes them: retry later
# Standard codes (RFC 6455 / IANA): a frame over the size limit (the web server itself closes with
# it too, above its --ws-max-size), and too many sockets from this address: retry later.
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013
