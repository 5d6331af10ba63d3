"""Following a gateway key rotation: open a desired state signed by a key the agent has not
pinned, through the chain of key certificates sent beside it (rules: clawnode.wire.keycert).

Pure: the daemon saves the enrolment this returns (enrollment.json, 0600, written whole and
renamed into place), so the next start trusts the new key directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import wire
from .keys import encode_key
from .state import Enrollment


def open_desired_state(
    envelope: Any, enrollment: Enrollment, key_certs: Any, now: int
) -> tuple[dict[str, Any], Enrollment | None]:
    """The verified body of a desired state, and the enrolment re-pinned to the key that signed
    it when that is not the pinned key (None when the pinned key verified it).

    A state the pinned key does not verify is accepted only when ``key_certs`` leads from the
    pinned key to a key that does; otherwise the pinned key's refusal stands (BadSignature), or
    the chain's own (BadSignature or ProtocolError, naming the certificate)."""
    if not isinstance(envelope, dict):
        raise wire.BadSignature("desired state is not a signed envelope")
    try:
        return wire.open_envelope(envelope, enrollment.gateway_key, wire.DESIRED_STATE), None
    except wire.BadSignature:
        if not key_certs:
            raise
    key, sequence = wire.follow_key_chain(
        enrollment.gateway_key, enrollment.gateway_key_sequence, key_certs, now
    )
    try:
        body = wire.open_envelope(envelope, key, wire.DESIRED_STATE)
    except wire.BadSignature as exc:
        raise wire.BadSignature(f"{exc} (nor for the key the certificates lead to)") from None
    repinned = dataclasses.replace(
        enrollment, gateway_public_key=encode_key(key), gateway_key_sequence=sequence
    )
    return body, repinned
