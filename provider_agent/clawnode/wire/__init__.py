"""The wire contract between agent and gateway, imported by both sides (``from clawnode import
wire``; ``wire.DesiredState``, ``wire.signed_envelope``). No system calls, no pyroute2 or NVML:
stdlib + PyNaCl only, so the gateway can import it without the agent's machinery.

- ``signing``: message kinds, canonical bytes, signatures, envelopes, freshness and nonces;
- ``fields``: ProtocolError and the checks of single fields (keys, node ids, endpoints);
- ``schema``: ``Message``, the base every message type derives validation, from_dict and
  to_dict from;
- ``messages``: the message types (enrolment, desired state, auth, ack, removal, metering);
- ``names``: the names table of a node's DNS responder;
- ``channel``: the websocket frames and close codes;
- ``keycert``: gateway key certificates and the rules a chain of them is followed by.

This module only gathers their public names: each is defined, and documented, in one of them.
"""

from .channel import (
    CLOSE_AUTH_FAILED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_BAD_MESSAGE,
    CLOSE_FORBIDDEN,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
)
from .fields import ProtocolError, parse_endpoint
from .keycert import KeyCert, follow_key_chain
from .messages import (
    PATH_STATES,
    PEER_KINDS,
    Ack,
    AgentAuth,
    Connectivity,
    DesiredState,
    EnrollRequest,
    GpuInfo,
    MeteringSample,
    PeerCounters,
    PeerResult,
    PeerSpec,
    Refusal,
    Removed,
    RoundTrip,
    RoundTrips,
    SandboxReport,
    SandboxSpec,
    SandboxStatus,
)
from .names import NameGroup, NameRecord, NameTable
from .signing import (
    ACK,
    ACK_V1,
    AGENT_AUTH,
    CONNECTIVITY,
    DESIRED_STATE,
    ENROLL,
    KEY_CERT,
    KINDS,
    METERING,
    NAMES,
    REFUSAL,
    REMOVED,
    ROUND_TRIPS,
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
    "CLOSE_RATE_LIMITED",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_LATER",
    "CONNECTIVITY",
    "DESIRED_STATE",
    "ENROLL",
    "KEY_CERT",
    "KINDS",
    "METERING",
    "NAMES",
    "PATH_STATES",
    "PEER_KINDS",
    "REFUSAL",
    "REMOVED",
    "ROUND_TRIPS",
    "SANDBOX_STATUS",
    "Ack",
    "AgentAuth",
    "BadSignature",
    "Connectivity",
    "DesiredState",
    "EnrollRequest",
    "GpuInfo",
    "KeyCert",
    "MeteringSample",
    "NameGroup",
    "NameRecord",
    "NameTable",
    "PeerCounters",
    "PeerResult",
    "PeerSpec",
    "ProtocolError",
    "Refusal",
    "Removed",
    "RoundTrip",
    "RoundTrips",
    "SandboxReport",
    "SandboxSpec",
    "SandboxStatus",
    "StaleMessage",
    "canonical_bytes",
    "check_fresh",
    "follow_key_chain",
    "new_nonce",
    "open_envelope",
    "parse_endpoint",
    "sign",
    "signed_envelope",
    "verify",
]
