"""Identity and WireGuard key handling (clawnode.keys)."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing
import pytest
from clawnode import keys
from clawnode.keys import (
    Identity,
    IdentityFileError,
    InvalidKey,
    encode_key,
    generate_wireguard_keypair,
    node_id_for,
    parse_ed25519_public_key,
    parse_wireguard_private_key,
    parse_wireguard_public_key,
    wireguard_public_key,
    x25519_public_from_ed25519,
)

pytestmark = pytest.mark.unit

WG = shutil.which("wg")
needs_wg = pytest.mark.skipif(WG is None, reason="wireguard-tools `wg` is not on PATH")

# RFC 8032 section 7.1, TEST 1.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_EMPTY_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
    "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
# RFC 7748 section 6.1 (Alice).
RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")

P = 2**255 - 19
ORDER8_A = 325606250916557431795983626356110631294008115727848805560023387167927233504
ORDER8_B = 39382357235489614581723060781553021112529911719440698176882885853963445705823
SMALL_ORDER = [0, 1, ORDER8_A, ORDER8_B, P - 1, P, P + 1]
SMALL_ORDER_ENCODINGS = [
    (u | top).to_bytes(32, "little") for u in SMALL_ORDER for top in (0, 1 << 255)
]


def wg_pubkey(private_b64: str) -> str:
    assert WG is not None
    result = subprocess.run(
        [WG, "pubkey"], input=private_b64 + "\n", capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


# -- encodings -------------------------------------------------------------------------------


def test_encode_key_is_padded_standard_base64() -> None:
    raw = bytes(range(250, 256)) + bytes(26)  # bytes that need '+' and '/'
    text = encode_key(raw)
    assert len(text) == 44 and text.endswith("=")
    assert base64.b64decode(text) == raw


def test_valid_public_key_round_trips() -> None:
    _, public = generate_wireguard_keypair()
    assert parse_wireguard_public_key(encode_key(public)) == public


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64 at all!", "not valid base64"),
        (" " + encode_key(RFC7748_PUBLIC), "not valid base64"),
        (encode_key(RFC7748_PUBLIC) + "\n", "not valid base64"),
        (encode_key(RFC7748_PUBLIC).rstrip("="), "not valid base64"),  # padding is required
        (encode_key(bytes(range(1, 32))), "must decode to 32 bytes, got 31"),
        (encode_key(bytes(range(1, 34))), "must decode to 32 bytes, got 33"),
        ("", "must decode to 32 bytes, got 0"),
    ],
)
def test_malformed_public_key_is_refused_with_reason(value: str, message: str) -> None:
    with pytest.raises(InvalidKey, match=message):
        parse_wireguard_public_key(value)


def test_non_string_key_is_refused() -> None:
    with pytest.raises(InvalidKey, match="must be a base64 string"):
        parse_wireguard_public_key(RFC7748_PUBLIC)  # type: ignore[arg-type]


def test_non_canonical_base64_spelling_is_refused() -> None:
    # The last character of a 32-byte key carries 2 unused bits. "...=" with those bits set
    # decodes to the same key; accepting it would let one key register twice under two names.
    canonical = encode_key(RFC7748_PUBLIC)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(canonical[42])
    sibling = canonical[:42] + alphabet[last | 1] + "="
    assert sibling != canonical
    assert base64.b64decode(sibling) == RFC7748_PUBLIC
    with pytest.raises(InvalidKey, match="not canonical"):
        parse_wireguard_public_key(sibling)


# -- small-order points -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", SMALL_ORDER_ENCODINGS, ids=lambda r: r.hex()[:8] + r.hex()[-4:])
def test_small_order_public_key_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidKey, match="is a small-order point"):
        parse_wireguard_public_key(encode_key(raw))


@pytest.mark.parametrize("raw", SMALL_ORDER_ENCODINGS, ids=lambda r: r.hex()[:8] + r.hex()[-4:])
def test_our_small_order_list_matches_libsodium(raw: bytes) -> None:
    # Cross-check the constants: libsodium refuses to multiply by each of them. A typo in our
    # table would be an ordinary point that libsodium accepts, and this test would fail.
    with pytest.raises(nacl.exceptions.RuntimeError):
        nacl.bindings.crypto_scalarmult(os.urandom(32), raw)


def test_ordinary_points_near_small_order_ones_are_accepted() -> None:
    for u in (2, 9, ORDER8_A + 1, P - 2):
        raw = u.to_bytes(32, "little")
        nacl.bindings.crypto_scalarmult(os.urandom(32), raw)  # libsodium agrees it is fine
        assert parse_wireguard_public_key(encode_key(raw)) == raw


# -- WireGuard key pairs ------------------------------------------------------------------------


def test_wireguard_public_key_matches_rfc7748_vector() -> None:
    assert wireguard_public_key(RFC7748_PRIVATE) == RFC7748_PUBLIC


def test_wireguard_public_key_refuses_wrong_length() -> None:
    with pytest.raises(InvalidKey, match="must be 32 bytes, got 31"):
        wireguard_public_key(bytes(31))


def test_generated_private_key_is_clamped_like_wg_genkey() -> None:
    for _ in range(32):
        private, public = generate_wireguard_keypair()
        assert private[0] & 0b111 == 0
        assert private[31] & 0x80 == 0 and private[31] & 0x40
        assert public == wireguard_public_key(private)


def test_generated_keypairs_differ() -> None:
    assert generate_wireguard_keypair() != generate_wireguard_keypair()


@needs_wg
def test_generated_keypair_matches_wg_pubkey() -> None:
    private, public = generate_wireguard_keypair()
    assert wg_pubkey(encode_key(private)) == encode_key(public)


@needs_wg
def test_private_key_from_wg_genkey_parses_and_matches_wg_pubkey() -> None:
    assert WG is not None
    private_b64 = subprocess.run(
        [WG, "genkey"], capture_output=True, text=True, check=True
    ).stdout.strip()
    private = parse_wireguard_private_key(private_b64)
    assert encode_key(wireguard_public_key(private)) == wg_pubkey(private_b64)


def test_private_key_errors_do_not_echo_the_key() -> None:
    canonical = encode_key(RFC7748_PRIVATE)
    for bad in (canonical[:-2] + "==", canonical + "AAAA", "x" + canonical[1:-1] + "!"):
        with pytest.raises(InvalidKey) as info:
            parse_wireguard_private_key(bad)
        assert canonical[:20] not in str(info.value)
        assert "private key" in str(info.value)


# -- identity -------------------------------------------------------------------------------


def test_identity_matches_rfc8032_vector() -> None:
    identity = Identity.from_seed(RFC8032_SEED)
    assert identity.public_key == RFC8032_PUBLIC
    assert identity.sign(b"") == RFC8032_EMPTY_SIG
    assert identity.public_key_b64 == encode_key(RFC8032_PUBLIC)


def test_identity_signature_verifies_with_public_key() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"hello")
    assert len(signature) == 64
    nacl.signing.VerifyKey(identity.public_key).verify(b"hello", signature)


def test_anyone_can_check_the_wireguard_key_belongs_to_the_identity() -> None:
    # The verifier only has the identity's public key and converts it; the node derived its
    # WireGuard key from the secret side. Both must land on the same X25519 point.
    for identity in (Identity.from_seed(RFC8032_SEED), Identity.generate()):
        assert x25519_public_from_ed25519(identity.public_key) == identity.wireguard_public_key
        assert identity.wireguard_public_key == wireguard_public_key(identity.wireguard_private_key)
        assert identity.wireguard_public_key_b64 == encode_key(identity.wireguard_public_key)


def test_wireguard_key_of_another_identity_does_not_match() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert x25519_public_from_ed25519(a.public_key) != b.wireguard_public_key


def test_identity_wireguard_private_key_is_clamped() -> None:
    private = Identity.generate().wireguard_private_key
    assert private[0] & 0b111 == 0 and private[31] & 0x80 == 0 and private[31] & 0x40


@needs_wg
def test_identity_wireguard_key_matches_wg_pubkey() -> None:
    for identity in (Identity.from_seed(RFC8032_SEED), Identity.generate()):
        private_b64 = encode_key(identity.wireguard_private_key)
        assert wg_pubkey(private_b64) == identity.wireguard_public_key_b64


def test_node_id_is_derived_from_the_public_key() -> None:
    identity = Identity.from_seed(RFC8032_SEED)
    assert identity.node_id == node_id_for(RFC8032_PUBLIC)
    assert identity.node_id.startswith("nd_") and len(identity.node_id) == 35
    assert identity.node_id != Identity.generate().node_id
    # Pin the derivation: the gateway stores these ids, so changing it breaks enrolled nodes.
    import hashlib

    expected = hashlib.sha256(b"molt/node-id/v1\n" + RFC8032_PUBLIC).hexdigest()[:32]
    assert identity.node_id == "nd_" + expected


def test_identity_refuses_wrong_seed_length() -> None:
    with pytest.raises(InvalidKey, match="identity seed must be 32 bytes, got 31"):
        Identity.from_seed(bytes(31))


def test_repr_and_str_hide_the_seed() -> None:
    identity = Identity.from_seed(RFC8032_SEED)
    for text in (repr(identity), str(identity), f"{identity}"):
        assert RFC8032_SEED.hex() not in text
        assert encode_key(RFC8032_SEED) not in text
        assert str(list(RFC8032_SEED)) not in text
        assert repr(RFC8032_SEED) not in text
        assert identity.node_id in text


def test_identities_compare_by_seed() -> None:
    assert Identity.from_seed(RFC8032_SEED) == Identity.from_seed(RFC8032_SEED)
    assert Identity.from_seed(RFC8032_SEED) != Identity.generate()
    assert len({Identity.from_seed(RFC8032_SEED), Identity.from_seed(RFC8032_SEED)}) == 1


def test_ed25519_public_key_parsing() -> None:
    assert parse_ed25519_public_key(encode_key(RFC8032_PUBLIC)) == RFC8032_PUBLIC
    with pytest.raises(InvalidKey, match="Ed25519 public key must decode to 32 bytes"):
        parse_ed25519_public_key(encode_key(bytes(16)))
    # All-zero is a small-order Ed25519 point: libsodium will not convert it.
    with pytest.raises(InvalidKey, match="not a valid curve point"):
        parse_ed25519_public_key(encode_key(bytes(32)))


# -- identity files -------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_writes_0600_file_in_0700_dirs(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "clawnode" / "identity"
    identity = Identity.generate()
    identity.save(path)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert mode_of(path.parent.parent) == 0o700
    assert path.read_bytes() == encode_key(identity.seed).encode() + b"\n"
    assert [p.name for p in path.parent.iterdir()] == ["identity"]  # no temp file left


def test_save_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Identity.generate().save(tmp_path / "identity")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "identity") == 0o600


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "identity")
    assert Identity.load(tmp_path / "identity") == identity


def test_save_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "identity"
    Identity.generate().save(path)
    second = Identity.generate()
    second.save(path)
    assert Identity.load(path) == second


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_file_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity"
    Identity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(IdentityFileError) as info:
        Identity.load(path)
    assert str(path) in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_load_accepts_0400(tmp_path: Path) -> None:
    path = tmp_path / "identity"
    identity = Identity.generate()
    identity.save(path)
    path.chmod(0o400)
    assert Identity.load(path) == identity


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (b"", "holds 0 bytes"),
        (b"not a seed\n", "does not hold a base64 seed"),
        (b"\xff\xfe\n", "does not hold a base64 seed"),
        (encode_key(bytes(16)).encode() + b"\n", "holds 16 bytes"),
    ],
)
def test_load_refuses_bad_contents(tmp_path: Path, contents: bytes, message: str) -> None:
    path = tmp_path / "identity"
    path.write_bytes(contents)
    path.chmod(0o600)
    with pytest.raises(IdentityFileError, match=message) as info:
        Identity.load(path)
    assert str(path) in str(info.value)


def test_load_error_does_not_echo_contents(tmp_path: Path) -> None:
    path = tmp_path / "identity"
    secretish = encode_key(os.urandom(31))
    path.write_text(secretish + "\n")
    path.chmod(0o600)
    with pytest.raises(IdentityFileError) as info:
        Identity.load(path)
    assert secretish not in str(info.value)


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "identity").mkdir(mode=0o700)
    with pytest.raises(IdentityFileError, match="not a regular file"):
        Identity.load(tmp_path / "identity")


def test_load_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Identity.load(tmp_path / "absent")


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity"
    first, created = Identity.load_or_create(path)
    assert created is True
    assert mode_of(path) == 0o600
    again, created_again = Identity.load_or_create(path)
    assert created_again is False
    assert again == first


def test_load_or_create_does_not_overwrite_a_file_that_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate losing the race: another process publishes its identity between our failed
    # load and our write. We must keep and return theirs, not replace it.
    path = tmp_path / "identity"
    theirs = Identity.generate()
    real_load = Identity.load.__func__  # type: ignore[attr-defined]
    calls = {"n": 0}

    def racing_load(cls: type[Identity], p: Path) -> Identity:
        calls["n"] += 1
        if calls["n"] == 1:
            theirs.save(path)
            raise FileNotFoundError(p)
        return real_load(cls, p)  # type: ignore[no-any-return]

    monkeypatch.setattr(Identity, "load", classmethod(racing_load))
    identity, created = Identity.load_or_create(path)
    assert (identity, created) == (theirs, False)
    assert keys.Identity.load(path) == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["identity"]
