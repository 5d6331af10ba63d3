"""A buyer's SSH public keys: checked as `ssh-keygen -l` would read them, fingerprinted as it
prints them, at most SshKey.MAX_PER_USER per account. Every key on the account when an order is
placed goes into that order's sandbox (marketplace.orders snapshots them into Order.ssh_keys).

Only a bare public key is taken, one per field: `type base64 [comment]`. A private key pasted by
mistake, authorized_keys options (a forced `command=...`, `from=...`), or several keys in one
field are refused with a message that says what to paste instead; every error is a MarketError
naming its field (`public_key` or `name`), so the API answers 400 with the field.

Locks: add_ssh_key locks the user's row, so two adds at once cannot pass the limit together.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction

from marketplace.errors import MarketError
from marketplace.models import SshKey
from marketplace.text import check_visible_text

# What OpenSSH's ssh-keygen -l takes as a plain public key. DSA is left out on purpose: OpenSSH
# no longer accepts it for login (disabled since 7.0, removed in 9.8), so it could never be used.
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
# OpenSSH refuses RSA moduli below this (SSH_RSA_MINIMUM_MODULUS_SIZE).
RSA_MIN_BITS = 1024
# A 16384-bit RSA key is about 2.8 kB of base64; anything much longer is not a key.
MAX_LENGTH = 8192
NAME_MAX_LENGTH = SshKey._meta.get_field("name").max_length

PRIVATE_KEY = "this is a private key: paste the .pub file (e.g. ~/.ssh/id_ed25519.pub)"
OPTIONS = (
    'options such as command="..." or from="..." are not accepted: paste the key alone '
    "(type, base64 key, optional comment)"
)
# authorized_keys options that take no value (sshd(8), AUTHORIZED_KEYS FILE FORMAT).
OPTION_WORDS = {
    "agent-forwarding",
    "cert-authority",
    "no-agent-forwarding",
    "no-port-forwarding",
    "no-pty",
    "no-user-rc",
    "no-X11-forwarding",
    "no-touch-required",
    "port-forwarding",
    "pty",
    "restrict",
    "user-rc",
    "verify-required",
    "X11-forwarding",
}


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    blob: bytes
    comment: str

    @property
    def line(self) -> str:
        """As authorized_keys takes it, without options."""
        encoded = base64.b64encode(self.blob).decode()
        return f"{self.key_type} {encoded} {self.comment}".rstrip()

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.blob)


def fingerprint_of(blob: bytes) -> str:
    """`SHA256:` and the unpadded base64 of the SHA-256 of the key blob, as ssh-keygen -l."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _bad(message: str) -> MarketError:
    return MarketError(message, field="public_key")


def _looks_private(text: str) -> bool:
    return "PRIVATE KEY" in text or text.lstrip().startswith("PuTTY-User-Key-File")


def _first_string(blob: bytes) -> bytes | None:
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > len(blob) - 4:
        return None
    return blob[4 : 4 + length]


def parse_public_key(text: str) -> PublicKey:
    """The one public key in `text`, or MarketError(field="public_key") saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise _bad("paste your public key: the one line of your .pub file")
    if _looks_private(text):
        raise _bad(PRIVATE_KEY)
    if len(text) > MAX_LENGTH:
        raise _bad(f"a public key is at most {MAX_LENGTH} characters")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tokens = text.split()
    # A key is a known type followed by its base64 blob (which always starts "AAAA": the
    # blob's first field is the type name's length); a type named in a comment is not a key.
    typed = [
        i
        for i, token in enumerate(tokens)
        if token in KEY_TYPES and i + 1 < len(tokens) and tokens[i + 1].startswith("AAAA")
    ] or [i for i, token in enumerate(tokens) if token in KEY_TYPES][:1]
    if len(typed) > 1:
        raise _bad("one key per field: add each key separately")
    if len(lines) > 1:
        raise _bad("a public key is one line: paste the whole .pub file, unwrapped")
    if not typed:
        if "=" in tokens[0] or tokens[0].split(",")[0] in OPTION_WORDS:
            raise _bad(OPTIONS)
        if tokens[0] == "ssh-dss":
            raise _bad("DSA keys are not accepted by OpenSSH any more: use an ed25519 key")
        if "-cert-" in tokens[0]:
            raise _bad("a certificate is not accepted here: paste the plain public key")
        raise _bad(f"unknown key type {tokens[0][:40]!r}; one of {', '.join(KEY_TYPES)}")
    if typed[0] != 0:
        # authorized_keys options before the key: a forced command, from=, no-pty...
        raise _bad(OPTIONS)
    if len(tokens) < 2:
        raise _bad("the key's base64 part is missing")
    key_type, encoded = tokens[0], tokens[1]
    comment = " ".join(tokens[2:])
    try:
        blob = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _bad("the key's base64 part is not valid base64") from None
    if _first_string(blob) != key_type.encode():
        raise _bad(f"the base64 part is not a {key_type} key")
    try:
        loaded = load_ssh_public_key(f"{key_type} {encoded}".encode())
    except (ValueError, TypeError, struct.error, UnsupportedAlgorithm):
        raise _bad(f"the base64 part is not a valid {key_type} key") from None
    if isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size < RSA_MIN_BITS:
        raise _bad(f"an RSA key must have at least {RSA_MIN_BITS} bits")
    return PublicKey(key_type=key_type, blob=blob, comment=comment)


def add_ssh_key(user, *, public_key: str, name: str = "") -> SshKey:
    """Add a checked public key to `user`'s account. `name` defaults to the key's comment (or
    its type). Locks: the user's row, so the limit holds under concurrent adds. Raises
    MarketError naming `public_key` (invalid, a duplicate, over the limit) or `name`."""
    key = parse_public_key(public_key)
    name = (name or "").strip()
    if len(name) > NAME_MAX_LENGTH:
        raise MarketError(f"a name is at most {NAME_MAX_LENGTH} characters", field="name")
    check_visible_text(name, "name")
    # A comment can be long (user@host plus notes): as a default name it is cut, not refused.
    name = name or (key.comment or key.key_type)[:NAME_MAX_LENGTH]
    with transaction.atomic():
        get_user_model().objects.select_for_update().filter(pk=user.pk).first()
        keys = SshKey.objects.filter(user=user)
        existing = keys.filter(fingerprint=key.fingerprint).first()
        if existing is not None:
            raise _bad(f"this key is already on your account, as {existing.name!r}")
        if keys.count() >= SshKey.MAX_PER_USER:
            raise _bad(
                f"an account holds at most {SshKey.MAX_PER_USER} keys: delete one you no longer "
                "use first"
            )
        try:
            with transaction.atomic():
                return SshKey.objects.create(
                    user=user, name=name, public_key=key.line, fingerprint=key.fingerprint
                )
        except IntegrityError:
            raise _bad("this key is already on your account") from None


def delete_ssh_key(user, key_id: int) -> bool:
    """Delete `user`'s key `key_id`; False when they have no such key. Placed orders keep the
    keys they were placed with (Order.ssh_keys)."""
    deleted, _ = SshKey.objects.filter(user=user, pk=key_id).delete()
    return deleted > 0
