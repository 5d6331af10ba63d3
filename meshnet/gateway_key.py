"""The gateway's Ed25519 root key: signs every desired state pushed to agents.

Kept in MOLT_STATE_DIR/gateway.key (0600), created on first use. Agents pin its public key at
enrolment and refuse state signed by anything else.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from clawnode.keys import Identity
from django.conf import settings


def gateway_key_path() -> Path:
    return Path(settings.MOLT_STATE_DIR) / "gateway.key"


@cache
def _load(path: str) -> Identity:
    identity, _created = Identity.load_or_create(Path(path))
    return identity


def gateway_identity() -> Identity:
    return _load(str(gateway_key_path()))
