"""The wire contract between agent and gateway, imported by both sides (``from clawnode import
wire``; ``wire.DesiredState``, ``wire.signed_envelope``). No system calls, no pyroute2 or NVML:
stdlib + PyNaCl only, so the gateway can import it without the agent's machinery.

- ``signing``: message kinds, canonical bytes, signatures, envelopes, freshness and nonces;
- ``fields``: ProtocolError and the checks of single fields (keys, node ids, endpoints);
- ``schema``: ``Message``, the base every message type derives validation, from_dict and
  to_dict from;
- ``messages``: the message types (enrolment, desired state, auth, ack, removal, metering);
- ``channel``: the websocket frames and close codes.

This module only gathers their public names: each is defined, and documented, in one of them.
"""

from .channel import CLOSE_AUTH_FAILED, CLOSE_AUTH_TIMEOUT, CLOSE_BAD_MESSAGE, CLOSE_FORBIDDEN
from .fields import ProtocolError, parse_endpoint
from .messages import (
    PEER_KINDS,
    Ack,
    AgentAuth,
    DesiredState,
    EnrollRequest,
    GpuInfo,
    MeteringSample,
    PeerCounters,
    PeerResult,
    PeerSpec,
    Refusal,
    Removed,
    SandboxReport,
    SandboxSpec,
    SandboxStatus,
)
from .signing import (
    ACK,
    ACK_V1,
    AGENT_AUTH,
    DESIRED_STATE,
    ENROLL,
    KEY_CERT,
    KINDS,
    METERING,
    REFUSAL,
    REMOVED,
    SANDBOX_STATUS,
    BadSignature,
    StaleMessage,
    canonical_bytes,
    check_fresh,
    new_nonce,
    open_envelope,
    sign,
    signed_envelope,
    verify,
)

__all__ = [
    "ACK",
    "ACK_V1",
    "AGENT_AUTH",
    "CLOSE_AUTH_FAILED",
    "CLOSE_AUTH_TIMEOUT",
    "CLOSE_BAD_MESSAGE",
    "CLOSE_FORBIDDEN",
    "DESIRED_STATE",
    "ENROLL",
    "KEY_CERT",
    "KINDS",
    "METERING",
    "PEER_KINDS",
    "REFUSAL",
    "REMOVED",
    "SANDBOX_STATUS",
    "Ack",
    "AgentAuth",
    "BadSignature",
    "DesiredState",
    "EnrollRequest",
    "GpuInfo",
    "MeteringSample",
    "PeerCounters",
    "PeerResult",
    "PeerSpec",
    "ProtocolError",
    "Refusal",
    "Removed",
    "SandboxReport",
    "SandboxSpec",
    "SandboxStatus",
    "StaleMessage",
    "canonical_bytes",
    "check_fresh",
    "new_nonce",
    "open_envelope",
    "parse_endpoint",
    "sign",
    "signed_envelope",
    "verify",
]
