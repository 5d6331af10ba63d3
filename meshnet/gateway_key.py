"""The gateway's Ed25519 key: signs every desired state (and refusal) pushed to agents, and its
rotation (``rotate_gateway_key``, run by ``manage.py rotate_gateway_key``).

Files in MOLT_STATE_DIR, all 0600:
- ``gateway.key``: the current key, created on first use. Agents pin its public key at
  enrolment and refuse state signed by anything else, unless a chain of key certificates from
  the key they pinned leads to it (clawnode.wire.keycert).
- ``gateway-key-certs.json``: that chain, oldest first: ``{"certificates": [envelope, ...]}``,
  each a ``molt/key-cert/v1`` envelope signed by the key it retires. Public, but kept with the
  keys; losing it means agents pinned to an older key must re-join.
- ``gateway-keys/<sequence>.key``: each retired key, kept (not used to sign again) so an
  operator can still prove what it signed; back them up with ``gateway.key``.

Web, worker and hub processes read the files again when they change (keyed on inode and
modification time), so a rotation needs no restart of web or worker.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from clawnode import wire
from clawnode.keys import Identity
from clawnode.state import write_private_atomically
from django.conf import settings

CERTS_FILE = "gateway-key-certs.json"
RETIRED_DIR = "gateway-keys"


def gateway_key_path() -> Path:
    return Path(settings.MOLT_STATE_DIR) / "gateway.key"


def _certs_path() -> Path:
    return Path(settings.MOLT_STATE_DIR) / CERTS_FILE


def _version(path: Path) -> tuple[int, int, int]:
    """What changes when the file is replaced (os.replace gives a new inode) or rewritten."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@cache
def _load(path: str, _version: tuple[int, int, int]) -> Identity:
    identity, _created = Identity.load_or_create(Path(path))
    return identity


def gateway_identity() -> Identity:
    path = gateway_key_path()
    return _load(str(path), _version(path))


@cache
def _load_certs(path: str, _version: tuple[int, int, int]) -> tuple[dict[str, Any], ...]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    return tuple(data["certificates"])


def key_certificates() -> list[dict[str, Any]]:
    """The chain of key certificates, oldest first; empty while the key was never rotated.
    Sent to agents beside every desired state (meshnet.consumers)."""
    path = _certs_path()
    return list(_load_certs(str(path), _version(path)))


def key_sequence(public_key_b64: str) -> int | None:
    """The place of this gateway key in the chain (key_certificates): 0 for the key that was
    current before any rotation, n for the key certificate n made current. None when the chain
    does not name it (a key file that is not the chain's, see rotate_gateway_key).

    Told to a node at enrolment beside the key it pins, so that it follows later certificates
    from that key's place in the chain (clawnode.wire.keycert). Read the key first, then ask
    this: a rotation in between has only added a certificate whose old_key is that key (the
    chain is written before gateway.key), so the answer still names the key read."""
    chain = key_certificates()
    for envelope in chain:
        body = envelope["body"]
        if body["old_key"] == public_key_b64:
            return int(body["sequence"]) - 1
        if body["new_key"] == public_key_b64:
            return int(body["sequence"])
    return None if chain else 0


@dataclass(frozen=True)
class Rotation:
    old_key: str
    new_key: str
    sequence: int


def current_key_since() -> float:
    """When the current key started signing (Unix time): the last certificate's not_before, or
    before any rotation the key file's modification time (a key created now if there was none)."""
    chain = key_certificates()
    if chain:
        return float(chain[-1]["body"]["not_before"])
    gateway_identity()
    return gateway_key_path().stat().st_mtime


def rotate_gateway_key(
    *, now: int | None = None, if_signed_for: float | None = None
) -> Rotation | None:
    """Make a new gateway key, certify it with the current one and make it current.

    With `if_signed_for` (seconds), only when the current key has signed at least that long
    (current_key_since), checked under the lock, so two schedulers due at once rotate once:
    None when it was not due.

    Under an exclusive lock on MOLT_STATE_DIR/gateway.lock (two rotations at once would fork the
    chain, which agents refuse). Order matters for processes reading meanwhile: the old key is
    kept first, then the chain gains the certificate, and only then does gateway.key change; a
    state signed in between is signed by the old key, which every agent still accepts. Each file
    is written whole and renamed into place (0600, fsynced)."""
    state_dir = Path(settings.MOLT_STATE_DIR)
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "gateway.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if if_signed_for is not None:
            clock = time.time() if now is None else now
            if clock - current_key_since() < if_signed_for:
                return None
        old = Identity.load_or_create(gateway_key_path())[0]
        chain = key_certificates()
        sequence = len(chain) + 1
        if chain and chain[-1]["body"]["new_key"] != old.public_key_b64:
            raise RuntimeError(
                f"{gateway_key_path()} is not the key the last certificate in {CERTS_FILE} "
                "names: restore the key from backup before rotating"
            )
        new = Identity.generate()
        cert = wire.KeyCert(
            old_key=old.public_key_b64,
            new_key=new.public_key_b64,
            sequence=sequence,
            not_before=int(time.time()) if now is None else now,
        )
        old.save(state_dir / RETIRED_DIR / f"{sequence - 1}.key")
        chain.append(wire.signed_envelope(wire.KEY_CERT, cert.to_dict(), old))
        text = json.dumps({"certificates": chain}, indent=1) + "\n"
        write_private_atomically(_certs_path(), text.encode("ascii"))
        new.save(gateway_key_path())
        os.utime(gateway_key_path())  # a new mtime even on a coarse-clock filesystem
    return Rotation(cert.old_key, cert.new_key, sequence)
