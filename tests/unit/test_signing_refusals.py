"""What the signing layer says when it refuses: each refusal names what was wrong (the kind, the
field, the type, the key's length), exactly, because an operator reading an agent's log or a
gateway's report has only these words to go on. tests/unit/test_protocol.py proves what is
accepted and refused; these pin the words (mutation testing found them unpinned: envelope's
survivors in docs/testing.md)."""

from __future__ import annotations

import base64

import pytest
from clawnode import wire
from clawnode.keys import Identity
from clawnode.wire import signing

KIND = signing.DESIRED_STATE


@pytest.fixture(scope="module")
def signer() -> Identity:
    return Identity.generate()


def test_a_body_that_is_not_an_object_is_refused_naming_its_type():
    with pytest.raises(wire.ProtocolError) as caught:
        signing.canonical_bytes(KIND, [1, 2])  # type: ignore[arg-type]
    assert str(caught.value) == "body must be a JSON object, got list"


def test_a_lone_surrogate_at_the_deepest_allowed_level_is_named_as_such_not_as_too_deep():
    # The innermost object sits at depth 31, its string at 32: within the limit. The fast
    # check passes it (it does not look at strings), encoding fails, and the full check must
    # start at depth 0 to name the surrogate rather than call the body too deep.
    body: dict = {"s": "\ud800"}
    for _ in range(31):
        body = {"a": body}
    with pytest.raises(wire.ProtocolError) as caught:
        signing.canonical_bytes(KIND, body)
    assert str(caught.value) == "body" + ".a" * 31 + ".s is not valid Unicode (lone surrogate)"


def test_an_unknown_kind_is_named_by_verify_and_open_envelope(signer):
    with pytest.raises(wire.ProtocolError) as caught:
        signing.verify(signer.public_key, "molt/nope/v1", {}, "x")
    assert str(caught.value) == "unknown message kind 'molt/nope/v1'"
    with pytest.raises(wire.ProtocolError) as caught:
        signing.open_envelope({}, signer.public_key, "molt/nope/v1")
    assert str(caught.value) == "unknown message kind 'molt/nope/v1'"


def test_a_signature_with_characters_outside_base64_is_called_invalid_base64(signer):
    good = signing.sign(signer, KIND, {"a": 1})
    # Non-alphabet characters: a lenient decoder would drop them and read a valid signature.
    spoiled = good[:10] + "!!" + good[10:]
    with pytest.raises(signing.BadSignature) as caught:
        signing.verify(signer.public_key, KIND, {"a": 1}, spoiled)
    assert str(caught.value) == f"{KIND} signature is not valid base64"


def test_a_verify_key_of_the_wrong_length_is_named(signer):
    body = {"a": 1}
    signature = signing.sign(signer, KIND, body)
    for key in (signer.public_key[:31], signer.public_key + b"\0"):
        with pytest.raises(signing.BadSignature) as caught:
            signing.verify(key, KIND, body, signature)
        assert str(caught.value) == f"{KIND} verify key must be 32 bytes"


def test_unexpected_envelope_fields_are_named_the_first_five_in_order(signer):
    envelope = signing.signed_envelope(KIND, {"a": 1}, signer)
    envelope.update({name: 1 for name in ("f", "b", "e", "a2", "d", "c")})
    with pytest.raises(signing.BadSignature) as caught:
        signing.open_envelope(envelope, signer.public_key, KIND)
    assert str(caught.value) == f"{KIND} envelope has unexpected fields: 'a2', 'b', 'c', 'd', 'e'"


def test_an_envelope_of_another_kind_names_both_kinds(signer):
    envelope = signing.signed_envelope(signing.METERING, {"a": 1}, signer)
    with pytest.raises(signing.BadSignature) as caught:
        signing.open_envelope(envelope, signer.public_key, KIND)
    assert str(caught.value) == f"expected a {KIND} message, got kind '{signing.METERING}'"


def test_a_timestamp_that_is_not_an_integer_is_named_with_its_type():
    with pytest.raises(signing.StaleMessage) as caught:
        signing.check_fresh("1700000000", 1_700_000_000)  # type: ignore[arg-type]
    assert str(caught.value) == "timestamp must be an integer, got str"


def test_the_canonical_signature_spelling_is_still_required(signer):
    # base64's spare bits: the last character of a 64-byte signature carries 2 unused bits,
    # so flipping them spells the same bytes differently.
    good = signing.sign(signer, KIND, {"a": 1})
    raw = base64.b64decode(good)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = good[-3]  # "xx==": the character before the padding
    other = alphabet[alphabet.index(last) ^ 1]
    respelled = good[:-3] + other + good[-2:]
    assert base64.b64decode(respelled) == raw
    with pytest.raises(signing.BadSignature) as caught:
        signing.verify(signer.public_key, KIND, {"a": 1}, respelled)
    assert str(caught.value) == f"{KIND} signature is not canonical base64"
