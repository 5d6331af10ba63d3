"""Node identity and WireGuard keys (pure: stdlib + PyNaCl, no Django).

A node has one Ed25519 identity key (a 32-byte seed in a 0600 file). Its epoch-0 WireGuard key is
the X25519 conversion of that identity, so anyone holding the identity's public key can check
that a WireGuard public key belongs to it (see design/network.md, "Identity and keys").

Key text format everywhere (configs, API, pyroute2): standard base64 of 32 bytes with padding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

__all__ = [
    "KEY_LEN",
    "Identity",
    "IdentityFileError",
    "InvalidKey",
    "encode_key",
    "generate_wireguard_keypair",
    "node_id_for",
    "parse_ed25519_public_key",
    "parse_wireguard_private_key",
    "parse_wireguard_public_key",
    "wireguard_public_key",
    "x25519_public_from_ed25519",
]

KEY_LEN = 32

# X25519 u-coordinates of small order, as in libsodium's has_small_order() blacklist
# (crypto_scalarmult/curve25519/ref10/x25519_ref10.c). A peer with such a key would make every
# shared secret predictable. Values are compared with the top bit of the last byte cleared
# (X25519 ignores it), which also covers the "same values with the top bit set" encodings.
# p + k for k >= 19 does not fit in 255 bits, so these seven are every small-order encoding.
_P = 2**255 - 19
_SMALL_ORDER_U = frozenset(
    {
        0,  # order 4
        1,  # order 1
        # the two points of order 8
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P - 1,  # order 2
        _P,  # non-canonical 0
        _P + 1,  # non-canonical 1
    }
)
_LOW_255_BITS = (1 << 255) - 1


class InvalidKey(ValueError):
    """A key is malformed or unsafe; the message names what is wrong (never the key material)."""


class IdentityFileError(ValueError):
    """The identity file is unsafe (group/other access) or its contents are not a seed."""


def encode_key(raw: bytes) -> str:
    """Standard base64 with padding: 44 characters for a 32-byte key (the `wg` format)."""
    return base64.b64encode(raw).decode("ascii")


def _decode_key(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidKey(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        # validate=True refuses whitespace and characters outside the alphabet instead of
        # silently dropping them.
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey(f"{what} is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"{what} must decode to {KEY_LEN} bytes, got {len(raw)}")
    # base64 leaves 2 spare bits in the last character; Python ignores them, so one key has
    # several spellings. Keys are compared and made unique as strings (one active peer per
    # public key in the mesh), so only the canonical spelling is accepted. (The message does not
    # show the canonical form: for a private key that would put the secret in a log.)
    if encode_key(raw) != value:
        raise InvalidKey(f"{what} is not canonical base64 (unused low bits are set)")
    return raw


def _is_small_order(u: bytes) -> bool:
    return int.from_bytes(u, "little") & _LOW_255_BITS in _SMALL_ORDER_U


def parse_wireguard_public_key(value: str) -> bytes:
    """Decode a WireGuard (X25519) public key; refuse bad base64, bad length and small order."""
    raw = _decode_key(value, "WireGuard public key")
    if _is_small_order(raw):
        raise InvalidKey("WireGuard public key is a small-order point")
    return raw


def parse_wireguard_private_key(value: str) -> bytes:
    """Decode a WireGuard private key (32 bytes, base64). Errors never echo the key."""
    raw = _decode_key(value, "WireGuard private key")
    # Any 32 bytes are a usable private key: X25519 clamps the scalar, and no clamped scalar
    # takes the base point to a small-order point, so there is nothing more to check.
    return raw


def parse_ed25519_public_key(value: str) -> bytes:
    """Decode an Ed25519 identity public key and check it is a usable curve point.

    The check is the X25519 conversion itself: libsodium refuses encodings that are not on the
    curve or have small order, and a node whose identity cannot be converted could not have an
    epoch-0 WireGuard key anyway.
    """
    raw = _decode_key(value, "Ed25519 public key")
    x25519_public_from_ed25519(raw)
    return raw


def _check_raw(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        got = len(key) if isinstance(key, bytes) else type(key).__name__
        raise InvalidKey(f"{what} must be {KEY_LEN} bytes, got {got}")


def wireguard_public_key(private_key: bytes) -> bytes:
    """X25519 public key of a private key, as `wg pubkey` computes it (libsodium clamps)."""
    _check_raw(private_key, "WireGuard private key")
    return nacl.bindings.crypto_scalarmult_base(private_key)


def _clamp(scalar: bytes) -> bytes:
    # Same clamping as `wg genkey` (curve25519_clamp_secret): clear the 3 low bits and the top
    # bit, set bit 254.
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_wireguard_keypair() -> tuple[bytes, bytes]:
    """A fresh random (private, public) X25519 pair; the private key is clamped like `wg genkey`."""
    private = _clamp(os.urandom(KEY_LEN))
    return private, wireguard_public_key(private)


def x25519_public_from_ed25519(ed25519_public: bytes) -> bytes:
    """The X25519 (WireGuard) public key matching an Ed25519 identity public key."""
    _check_raw(ed25519_public, "Ed25519 public key")
    try:
        return bytes(nacl.signing.VerifyKey(ed25519_public).to_curve25519_public_key())
    except nacl.exceptions.CryptoError:
        raise InvalidKey("Ed25519 public key is not a valid curve point") from None


def node_id_for(ed25519_public: bytes) -> str:
    """Stable node id derived from the identity public key (domain-separated hash, 128 bits)."""
    _check_raw(ed25519_public, "Ed25519 public key")
    return "nd_" + hashlib.sha256(b"molt/node-id/v1\n" + ed25519_public).hexdigest()[:32]


@dataclass(frozen=True)
class Identity:
    """A node's (or the gateway's) Ed25519 identity, held as its 32-byte seed.

    The seed never appears in repr, errors or logs.
    """

    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_raw(self.seed, "identity seed")

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id!r})"

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(KEY_LEN))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(seed)

    # -- derived keys --------------------------------------------------------------------
    # cached_property writes straight into the instance __dict__, which a frozen dataclass
    # allows; eq/hash still use only `seed`.

    @cached_property
    def _signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def public_key_b64(self) -> str:
        return encode_key(self.public_key)

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    @property
    def wireguard_private_key(self) -> bytes:
        # libsodium hashes the seed (SHA-512, as Ed25519 does) and clamps the result.
        return bytes(self._signing_key.to_curve25519_private_key())

    @property
    def wireguard_public_key(self) -> bytes:
        return wireguard_public_key(self.wireguard_private_key)

    @property
    def wireguard_public_key_b64(self) -> str:
        return encode_key(self.wireguard_public_key)

    def sign(self, data: bytes) -> bytes:
        """64-byte detached Ed25519 signature of ``data``."""
        return self._signing_key.sign(data).signature

    # -- file storage --------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a seed file (base64 + newline). Refuses files group or others can access.

        Raises FileNotFoundError if absent, IdentityFileError if unsafe or malformed.
        """
        path = Path(path)
        # Check the mode on the opened descriptor, not the name, so a swap between check and
        # read cannot slip another file in.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IdentityFileError(f"identity file {path} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise IdentityFileError(
                    f"identity file {path} has mode {mode:04o}; it must not be accessible "
                    f"by group or others (chmod 600 {path})"
                )
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            # Errors below must not quote the contents: they are (almost) the secret.
            text = data.decode("ascii").rstrip("\r\n")
            seed = base64.b64decode(text, validate=True)
        except (UnicodeDecodeError, binascii.Error, ValueError):
            raise IdentityFileError(f"identity file {path} does not hold a base64 seed") from None
        if len(seed) != KEY_LEN:
            raise IdentityFileError(
                f"identity file {path} holds {len(seed)} bytes, expected a {KEY_LEN}-byte seed"
            )
        return cls(seed)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the seed atomically with mode 0600, replacing any existing file.

        Creates missing parent directories with mode 0700 (existing ones are left alone).
        """
        self._write(Path(path), replace=True)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> tuple[Identity, bool]:
        """Load the identity at ``path``, or create it. Returns (identity, created).

        Safe against two processes racing to create: the file is published with link(2),
        which fails if it exists, and the loser loads the winner's identity.
        """
        path = Path(path)
        try:
            return cls.load(path), False
        except FileNotFoundError:
            pass
        identity = cls.generate()
        try:
            identity._write(path, replace=False)
        except FileExistsError:
            return cls.load(path), False
        return identity, True

    def _write(self, path: Path, *, replace: bool) -> None:
        parent = path.parent
        _make_private_dirs(parent)
        # mkstemp creates the file 0600 with O_EXCL, so the seed is never readable by others,
        # not even for a moment; fchmod guards against an unusual umask (e.g. 0400 result).
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(encode_key(self.seed).encode("ascii") + b"\n")
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
                tmp.unlink()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(parent)


def _make_private_dirs(directory: Path) -> None:
    # Path.mkdir(parents=True) and os.makedirs give intermediate directories the default mode;
    # every directory we create on the way to the seed gets 0700. Existing ones (/etc, /var/lib)
    # are not ours to change.
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue  # created concurrently (e.g. a second `clawnode join`); keep theirs
        d.chmod(0o700)  # the umask may have removed bits we need (owner write)


def _fsync_dir(directory: Path) -> None:
    # Make the rename durable: a crash right after join must not lose the identity.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
