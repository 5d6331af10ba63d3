"""Canonical signing and wire types shared by agent and gateway (clawnode.wire)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import OrderedDict
from typing import Any

import pytest
from clawnode import wire
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair
from clawnode.wire import (
    ACK,
    ACK_V1,
    AGENT_AUTH,
    DESIRED_STATE,
    ENROLL,
    KEY_CERT,
    KINDS,
    METERING,
    REMOVED,
    BadSignature,
    DesiredState,
    EnrollRequest,
    GpuInfo,
    PeerSpec,
    ProtocolError,
    StaleMessage,
    canonical_bytes,
    check_fresh,
    new_nonce,
    open_envelope,
    parse_endpoint,
    sign,
    signed_envelope,
    verify,
)
from clawnode.wire.signing import _plainly_canonical
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
GATEWAY = Identity.from_seed(RFC8032_SEED)
NODE = Identity.from_seed(bytes(range(32)))
STRANGER = Identity.from_seed(bytes(range(32, 64)))


def wg_pub() -> str:
    return encode_key(generate_wireguard_keypair()[1])


# -- canonical bytes ------------------------------------------------------------------------


def test_kinds_are_the_documented_strings() -> None:
    assert {
        "molt/enroll/v1",
        "molt/agent-auth/v1",
        "molt/desired-state/v1",
        "molt/ack/v2",
        "molt/ack/v1",
        "molt/metering/v1",
        "molt/removed/v1",
        "molt/key-cert/v1",
        "molt/sandbox-status/v1",
        "molt/refusal/v1",
        "molt/connectivity/v1",
        "molt/names/v1",
        "molt/round-trips/v1",
    } == KINDS
    assert {
        ENROLL,
        AGENT_AUTH,
        DESIRED_STATE,
        ACK,
        ACK_V1,
        METERING,
        REMOVED,
        KEY_CERT,
        wire.SANDBOX_STATUS,
        wire.REFUSAL,
        wire.CONNECTIVITY,
        wire.NAMES,
        wire.ROUND_TRIPS,
    } == KINDS


def test_canonical_bytes_exact_format() -> None:
    body = {"z": [1, True, None], "a": "é", "m": {"y": -3, "b": ""}}
    assert canonical_bytes(ACK, body) == (
        b'molt/ack/v2\n{"a":"\xc3\xa9","m":{"b":"","y":-3},"z":[1,true,null]}'
    )


def test_canonical_bytes_ignore_key_order_and_whitespace() -> None:
    one = {"revision": 3, "peers": [{"b": 1, "a": 2}], "node_id": "x"}
    two: dict[str, Any] = {}
    two["node_id"] = "x"
    two["peers"] = [{"a": 2, "b": 1}]
    two["revision"] = 3
    # The same body as received over the wire, pretty-printed by some other implementation.
    three = json.loads(json.dumps(one, indent=4, separators=(" ,  ", " :  ")))
    assert canonical_bytes(DESIRED_STATE, one) == canonical_bytes(DESIRED_STATE, two)
    assert canonical_bytes(DESIRED_STATE, one) == canonical_bytes(DESIRED_STATE, three)


def test_tuples_encode_like_lists() -> None:
    assert canonical_bytes(ACK, {"a": (1, 2)}) == canonical_bytes(ACK, {"a": [1, 2]})


def test_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(ProtocolError, match="molt/bogus/v1"):
        canonical_bytes("molt/bogus/v1", {})
    with pytest.raises(ValueError, match="unknown message kind"):
        canonical_bytes("molt/ack/v3", {})


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"x": 1.0}, "body.x"),
        ({"a": {"b": [1, 2, 0.5]}}, r"body.a.b\[2\]"),
        ({"n": float("nan")}, "body.n"),
        ({"i": float("inf")}, "body.i"),
    ],
)
def test_floats_are_refused_naming_the_path(body: dict[str, Any], path: str) -> None:
    with pytest.raises(ProtocolError, match=f"{path} is a float") as info:
        canonical_bytes(METERING, body)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({1: "x"}, "non-string key"),
        ({"b": b"bytes"}, "body.b has unsupported type bytes"),
        ({"s": {1, 2}}, "body.s has unsupported type set"),
        ({"big": 2**53}, "body.big is outside the interoperable integer range"),
        ({"small": -(2**53)}, "body.small is outside"),
        ({"s": "\ud800"}, "body.s is not valid Unicode"),
        ({"\udfff": 1}, "not valid Unicode"),
    ],
)
def test_bodies_without_canonical_form_are_refused(body: Any, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        canonical_bytes(ACK, body)


def test_safe_integer_limits_are_accepted() -> None:
    top = 2**53 - 1
    assert canonical_bytes(ACK, {"a": top, "b": -top}).endswith(
        f'{{"a":{top},"b":-{top}}}'.encode()
    )


def test_safe_integer_limits_are_accepted_where_the_full_check_judges_them_too() -> None:
    # A tuple is not "plainly canonical": the full check (_check_json_value) judges its items,
    # with the same inclusive bounds as the fast path.
    top = 2**53 - 1
    assert canonical_bytes(ACK, {"a": (top, -top)}).endswith(f'{{"a":[{top},-{top}]}}'.encode())
    for beyond in (top + 1, -top - 1):
        with pytest.raises(ProtocolError, match=r"body.a\[0\] is outside") as info:
            canonical_bytes(ACK, {"a": (beyond,)})
        assert info.value.field == "body.a[0]"


def test_a_refusal_names_the_offending_field_in_its_field_attribute() -> None:
    # The gateway answers with ProtocolError.field (which field to fix), not only the message.
    with pytest.raises(ProtocolError) as info:
        canonical_bytes(ACK, {"s": "\ud800"})
    assert info.value.field == "body.s"
    with pytest.raises(ProtocolError) as info:
        canonical_bytes(ACK, {"a": [{"b": "ok", "c": "\udfff"}]})
    assert info.value.field == "body.a[0].c"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"x": [0.5]}, "body.x[0]", "body.x[0] is a float; the protocol uses integers and strings"),
        ({"big": 2**53}, "body.big", "body.big is outside the interoperable integer range"),
        ({"x": {1: "a"}}, "body.x", "body.x has a non-string key 1"),
        ({"b": b"x"}, "body.b", "body.b has unsupported type bytes"),
        ({"\udfff": 1}, "body key '\\udfff'", "body key '\\udfff' is not valid Unicode"),
        ({"k" * 100: 0.5}, "body." + "k" * 64, f"body.{'k' * 64} is a float"),
    ],
)
def test_each_refusal_names_its_field_in_the_message_and_the_field_attribute(
    body: dict[Any, Any], field: str, message: str
) -> None:
    # The gateway answers with ProtocolError.field (which field to fix); a key is named cut to
    # 64 characters, since it is attacker-supplied text.
    with pytest.raises(ProtocolError) as info:
        canonical_bytes(ACK, body)
    assert info.value.field == field
    assert str(info.value).startswith(message)


def test_lists_nested_too_deep_are_refused_naming_the_first_level_past_the_cap() -> None:
    body: dict[str, Any] = {"x": []}
    inner = body["x"]
    for _ in range(40):
        inner.append([])
        inner = inner[0]
    with pytest.raises(ProtocolError, match="nested deeper than 32 levels") as info:
        canonical_bytes(ACK, body)
    assert info.value.field == "body.x" + "[0]" * 32


def nested(depth: int, leaf: Any, kind: type = dict) -> Any:
    """`leaf` inside `depth` dicts ({"x": ...}) or lists ([...])."""
    value = leaf
    for _ in range(depth):
        value = {"x": value} if kind is dict else [value]
    return value


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"s": "text", "n": None, "t": True, "f": False, "i": 2**53 - 1, "j": -(2**53 - 1)},
        {"peers": [{"key": "k", "port": 51820, "ips": ["10.0.0.1/32"], "keepalive": None}]},
        {"l": ["a", None, False, 7, 2**53 - 1, -(2**53 - 1), [], {}]},
        nested(32, {}),  # an empty object at the deepest level allowed
        nested(31, nested(1, [], list)),
        # What it says of a value on its own (a body's items are judged inline, not by a call).
        "text",
        None,
        True,
        2**53 - 1,
        -(2**53 - 1),
    ],
)
def test_a_plain_valid_body_is_judged_by_the_fast_path_alone(body: Any) -> None:
    # _plainly_canonical spares a valid desired state the full check, which builds a path
    # string per value (most of the cost of checking a large one); it must say yes to the
    # plain bodies the protocol sends, or every check pays that cost again.
    assert _plainly_canonical(body, 0) is True
    if isinstance(body, dict):
        canonical_bytes(ACK, body)


@pytest.mark.parametrize(
    "body",
    [
        {"x": 0.5},
        {"x": [0.5]},
        {"i": 2**53},
        {"l": [-(2**53)]},
        {"x": (1, 2)},
        {1: "x"},
        {"x": b"bytes"},
        {"x": OrderedDict()},
        nested(33, {}),
        nested(32, {"y": 1}),
        nested(32, [1], list),
        2**53,
        -(2**53),
        0.0,
    ],
)
def test_the_fast_path_leaves_anything_it_is_unsure_of_to_the_full_check(body: Any) -> None:
    assert _plainly_canonical(body, 0) is False


def test_body_must_be_an_object() -> None:
    with pytest.raises(ProtocolError, match="body must be a JSON object"):
        canonical_bytes(ACK, [1, 2])  # type: ignore[arg-type]


def test_deep_nesting_is_refused_not_a_crash() -> None:
    body: dict[str, Any] = {}
    inner = body
    for _ in range(100):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(ProtocolError, match="nested deeper") as info:
        canonical_bytes(ACK, body)
    # The first level past the cap (33 below the body) is named, message and field alike.
    assert info.value.field == "body" + ".x" * 33
    assert str(info.value).startswith(f"{info.value.field} is nested deeper than 32 levels")


# -- signatures -----------------------------------------------------------------------------


def test_sign_then_verify() -> None:
    body = {"node_id": NODE.node_id, "challenge": "abc", "timestamp": 1_700_000_000}
    signature = sign(NODE, AGENT_AUTH, body)
    assert len(base64.b64decode(signature, validate=True)) == 64
    verify(NODE.public_key, AGENT_AUTH, body, signature)


def test_golden_signature_is_stable() -> None:
    # Pins the whole pipeline (prefix, canonical JSON, Ed25519) to fixed bytes: an accidental
    # change of encoding breaks every deployed agent, and this fails first.
    body = {"revision": 7, "node_id": "nd_" + "0" * 32, "peers": [], "issued_at": 1700000000}
    assert canonical_bytes(DESIRED_STATE, body) == (
        b"molt/desired-state/v1\n"
        b'{"issued_at":1700000000,"node_id":"nd_00000000000000000000000000000000",'
        b'"peers":[],"revision":7}'
    )
    assert sign(GATEWAY, DESIRED_STATE, body) == GOLDEN_SIGNATURE


# Cross-checked with OpenSSL (independent Ed25519) over the literal bytes above:
#   openssl pkeyutl -sign -inkey <PKCS#8 of RFC8032_SEED> -keyform DER -rawin -in msg | base64
GOLDEN_SIGNATURE = (
    "gK0c/9lSdb8GGUcSSOX783OSPyV8glAZPwjgAmjjt18XS4Fam/1gSYUf1WcwIuDQzkhTObGyet+pNs/Oqpq2BA=="
)


def test_sign_accepts_a_raw_seed() -> None:
    body = {"a": 1}
    assert sign(RFC8032_SEED, ACK, body) == sign(GATEWAY, ACK, body)


def test_signature_for_one_kind_does_not_verify_as_another() -> None:
    body = {"node_id": NODE.node_id, "revision": 1}
    signature = sign(NODE, ACK, body)
    for other in KINDS - {ACK}:
        with pytest.raises(BadSignature, match="does not match"):
            verify(NODE.public_key, other, body, signature)


def test_tampered_body_fails() -> None:
    body = {"peers": [{"public_key": "A", "allowed_ips": ["10.100.128.9/32"]}], "revision": 4}
    signature = sign(GATEWAY, DESIRED_STATE, body)
    tampered = json.loads(json.dumps(body))
    tampered["peers"][0]["allowed_ips"].append("10.200.0.0/16")
    with pytest.raises(BadSignature):
        verify(GATEWAY.public_key, DESIRED_STATE, tampered, signature)
    bumped = {**body, "revision": 5}
    with pytest.raises(BadSignature):
        verify(GATEWAY.public_key, DESIRED_STATE, bumped, signature)


def test_signature_by_another_key_fails() -> None:
    body = {"revision": 1}
    with pytest.raises(BadSignature, match="does not match"):
        verify(GATEWAY.public_key, DESIRED_STATE, body, sign(STRANGER, DESIRED_STATE, body))


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(63)).decode(), "must decode to 64 bytes, got 63"),
        ("", "must decode to 64 bytes, got 0"),
        (None, "must be a base64 string"),
        (base64.b64encode(bytes(64)).decode(), "does not match"),
    ],
)
def test_malformed_signatures_raise_bad_signature(signature: Any, message: str) -> None:
    with pytest.raises(BadSignature, match=message):
        verify(GATEWAY.public_key, ACK, {"a": 1}, signature)


def test_non_canonical_signature_spelling_is_refused() -> None:
    body = {"a": 1}
    good = sign(GATEWAY, ACK, body)
    raw = base64.b64decode(good)
    # 64 bytes leave 4 spare bits in the last character before "=="; set one of them.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    sibling = good[:-3] + alphabet[alphabet.index(good[-3]) | 1] + "=="
    if sibling == good:
        sibling = good[:-3] + alphabet[alphabet.index(good[-3]) | 2] + "=="
    assert base64.b64decode(sibling) == raw
    with pytest.raises(BadSignature, match="not canonical"):
        verify(GATEWAY.public_key, ACK, body, sibling)


@pytest.mark.parametrize("key", [bytes(31), bytes(32), b"\xff" * 32, "a string"])
def test_bad_verify_keys_raise_bad_signature_not_nacl_errors(key: Any) -> None:
    with pytest.raises(BadSignature):
        verify(key, ACK, {"a": 1}, sign(GATEWAY, ACK, {"a": 1}))


def test_body_with_float_cannot_verify() -> None:
    signature = sign(GATEWAY, METERING, {"rx": 1})
    with pytest.raises(BadSignature, match=r"body.rx is a float"):
        verify(GATEWAY.public_key, METERING, {"rx": 1.0}, signature)


def test_verify_with_unknown_kind_is_a_caller_bug() -> None:
    with pytest.raises(ProtocolError, match="unknown message kind"):
        verify(GATEWAY.public_key, "molt/nope/v1", {}, sign(GATEWAY, ACK, {}))


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
json_bodies = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


@given(body=json_bodies, kind=st.sampled_from(sorted(KINDS)))
def test_property_canonical_is_deterministic_and_signatures_verify(
    body: dict[str, Any], kind: str
) -> None:
    encoded = canonical_bytes(kind, body)
    # Same bytes after a JSON round trip with another key order (what the other side sees).
    reparsed = json.loads(json.dumps(dict(reversed(list(body.items()))), indent=2))
    assert canonical_bytes(kind, reparsed) == encoded
    # The body part is valid JSON equal to the input.
    prefix, _, text = encoded.partition(b"\n")
    assert prefix == kind.encode()
    assert json.loads(text.decode("utf-8")) == body
    signature = sign(NODE, kind, body)
    verify(NODE.public_key, kind, reparsed, signature)


@given(body=json_bodies, extra=json_scalars)
def test_property_any_change_breaks_the_signature(body: dict[str, Any], extra: Any) -> None:
    signature = sign(NODE, ACK, body)
    changed = {**body, "\x00added": extra}
    with pytest.raises(BadSignature):
        verify(NODE.public_key, ACK, changed, signature)


# -- envelopes ------------------------------------------------------------------------------


def test_envelope_round_trip() -> None:
    body = {"node_id": NODE.node_id, "revision": 2, "peers": [], "issued_at": 1}
    envelope = signed_envelope(DESIRED_STATE, body, GATEWAY)
    assert set(envelope) == {"kind", "body", "signature"}
    received = json.loads(json.dumps(envelope))
    assert open_envelope(received, GATEWAY.public_key, DESIRED_STATE) == body


def test_envelope_of_another_kind_is_refused() -> None:
    envelope = signed_envelope(ACK, {"revision": 2}, NODE)
    with pytest.raises(BadSignature, match="expected a molt/desired-state/v1 message"):
        open_envelope(envelope, NODE.public_key, DESIRED_STATE)


def test_envelope_with_relabelled_kind_is_refused() -> None:
    # An attacker relabels a genuine ACK as desired state: the kind is inside the signed bytes.
    envelope = signed_envelope(ACK, {"revision": 2}, GATEWAY)
    envelope["kind"] = DESIRED_STATE
    with pytest.raises(BadSignature, match="does not match"):
        open_envelope(envelope, GATEWAY.public_key, DESIRED_STATE)


def test_envelope_signed_by_stranger_is_refused() -> None:
    envelope = signed_envelope(DESIRED_STATE, {"revision": 2}, STRANGER)
    with pytest.raises(BadSignature):
        open_envelope(envelope, GATEWAY.public_key, DESIRED_STATE)


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        ([], "envelope must be a JSON object"),
        ({"kind": DESIRED_STATE, "body": {}}, "must be a base64 string"),
        ({"kind": DESIRED_STATE, "body": [], "signature": "x"}, "body must be a JSON object"),
        ({"body": {}, "signature": "x"}, "got kind None"),
        ({"kind": DESIRED_STATE, "body": {}, "signature": "", "x": 1}, "unexpected fields"),
    ],
)
def test_malformed_envelopes_raise_bad_signature(envelope: Any, message: str) -> None:
    with pytest.raises(BadSignature, match=message):
        open_envelope(envelope, GATEWAY.public_key, DESIRED_STATE)


# -- freshness and nonces -------------------------------------------------------------------


def test_check_fresh_accepts_within_skew() -> None:
    check_fresh(1000, 1000)
    check_fresh(880, 1000)
    check_fresh(1120, 1000)
    check_fresh(1000, 1300, max_skew=300)


def test_check_fresh_names_the_skew() -> None:
    with pytest.raises(StaleMessage, match=r"121 s in the past \(allowed skew 120 s\)"):
        check_fresh(879, 1000)
    with pytest.raises(StaleMessage, match="500 s in the future"):
        check_fresh(1500, 1000)


def test_check_fresh_refuses_non_integer_timestamp() -> None:
    with pytest.raises(StaleMessage, match="must be an integer"):
        check_fresh("1000", 1000)  # type: ignore[arg-type]


def test_nonces_are_random_urlsafe_128_bits() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    for nonce in nonces:
        assert len(nonce) == 22
        assert len(base64.urlsafe_b64decode(nonce + "==")) == 16
        assert set(nonce) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


# -- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("203.0.113.1:51820", ("203.0.113.1", 51820)),
        ("[2001:db8::1]:51820", ("2001:db8::1", 51820)),
        ("node-1.example.com:1", ("node-1.example.com", 1)),
    ],
)
def test_parse_endpoint(text: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "203.0.113.1",
        "203.0.113.1:0",
        "203.0.113.1:65536",
        "2001:db8::1:51820",
        ":51820",
        "[nope]:1",
        "host name:1",
        "host:+1",
        "host:٣",
    ],
)
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoint(text)


# -- message types --------------------------------------------------------------------------


def gpu_dict(**overrides: Any) -> dict[str, Any]:
    base = {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_mb": 81559,
        "uuid": "GPU-5d7e1c2a-0000-4000-8000-000000000000",
    }
    return {**base, **overrides}


def enroll_dict(**overrides: Any) -> dict[str, Any]:
    base = {
        "token": "molt_enr_abcdef123456",
        "identity_public_key": NODE.public_key_b64,
        "wireguard_public_key": NODE.wireguard_public_key_b64,
        "hostname": "gpu-box-1",
        "listen_port": 51820,
        "endpoint": "203.0.113.1:51820",
        "gpus": [gpu_dict(), gpu_dict(index=1, simulated=True, driver_version="550.54")],
        "timestamp": 1_700_000_000,
        "nonce": new_nonce(),
    }
    return {**base, **overrides}


def peer_dict(**overrides: Any) -> dict[str, Any]:
    base = {
        "public_key": wg_pub(),
        "allowed_ips": ["10.100.128.9/32"],
        "kind": "job",
        "ref": "ord_123",
    }
    return {**base, **overrides}


def desired_dict(**overrides: Any) -> dict[str, Any]:
    base = {
        "node_id": NODE.node_id,
        "revision": 3,
        "peers": [
            peer_dict(),
            peer_dict(
                kind="mesh",
                ref=STRANGER.node_id,
                allowed_ips=["10.100.0.0/24"],
                endpoint="[2001:db8::2]:51820",
                persistent_keepalive=25,
            ),
        ],
        "issued_at": 1_700_000_000,
    }
    return {**base, **overrides}


def test_gpu_round_trip_and_defaults() -> None:
    gpu = GpuInfo.from_dict(gpu_dict())
    assert gpu.driver_version == "" and gpu.cuda_version == "" and gpu.simulated is False
    assert GpuInfo.from_dict(gpu.to_dict()) == gpu
    assert gpu.to_dict() == {
        **gpu_dict(),
        "driver_version": "",
        "cuda_version": "",
        "simulated": False,
    }


def test_enroll_request_round_trip_through_json_and_signature() -> None:
    data = enroll_dict()
    request = EnrollRequest.from_dict(data)
    assert request.gpus[1].simulated is True
    assert request.identity_key == NODE.public_key
    received = json.loads(json.dumps(signed_envelope(ENROLL, request.to_dict(), NODE)))
    body = open_envelope(received, request.identity_key, ENROLL)
    assert EnrollRequest.from_dict(body) == request
    assert request.to_dict()["gpus"][0] == GpuInfo.from_dict(gpu_dict()).to_dict()


def test_peer_and_desired_state_round_trip() -> None:
    data = desired_dict()
    state = DesiredState.from_dict(data)
    assert isinstance(state.peers, tuple) and isinstance(state.peers[0].allowed_ips, tuple)
    assert state.to_dict() == {
        **data,
        "peers": [
            {"endpoint": "", "persistent_keepalive": 0, **data["peers"][0]},
            data["peers"][1],
        ],
        "sandboxes": [],
    }
    assert DesiredState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    hash(state)  # frozen and tuple-valued: usable in sets and as dict keys


def test_desired_state_round_trip_through_signed_envelope() -> None:
    state = DesiredState.from_dict(desired_dict())
    envelope = json.loads(json.dumps(signed_envelope(DESIRED_STATE, state.to_dict(), GATEWAY)))
    assert (
        DesiredState.from_dict(open_envelope(envelope, GATEWAY.public_key, DESIRED_STATE)) == state
    )


def test_constructor_validates_like_from_dict() -> None:
    with pytest.raises(ProtocolError, match="listen_port must be between 1 and 65535, got 0"):
        EnrollRequest(**{**enroll_dict(listen_port=0), "gpus": ()})
    peer = PeerSpec(
        public_key=wg_pub(),
        allowed_ips=["10.100.128.9/32"],  # type: ignore[arg-type]
        kind="job",
        ref="ord_1",
    )
    assert peer.allowed_ips == ("10.100.128.9/32",)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"token": ""}, "token", "token must not be empty"),
        ({"token": 5}, "token", "token must be a string, got int"),
        ({"identity_public_key": "abc"}, "identity_public_key", "not valid base64"),
        (
            {"identity_public_key": encode_key(bytes(32))},
            "identity_public_key",
            "not a valid curve point",
        ),
        (
            {"wireguard_public_key": encode_key(bytes(32))},
            "wireguard_public_key",
            "is a small-order point",
        ),
        (
            {"wireguard_public_key": encode_key(bytes(31))},
            "wireguard_public_key",
            "must decode to 32 bytes, got 31",
        ),
        ({"hostname": "a\nb"}, "hostname", "control characters"),
        ({"listen_port": 70000}, "listen_port", "between 1 and 65535"),
        ({"listen_port": True}, "listen_port", "must be an integer, got bool"),
        ({"listen_port": "51820"}, "listen_port", "must be an integer, got str"),
        ({"endpoint": "203.0.113.1"}, "endpoint", "must be host:port"),
        ({"gpus": "none"}, "gpus", "gpus must be a list"),
        (
            {"gpus": [gpu_dict(), gpu_dict(memory_mb=-1)]},
            "gpus[1].memory_mb",
            r"gpus\[1\].memory_mb must be between",
        ),
        ({"gpus": [gpu_dict(simulated="yes")]}, "gpus[0].simulated", "must be a boolean"),
        ({"gpus": [{"index": 0}]}, "gpus[0].name", r"gpus\[0\].name is required"),
        ({"gpus": [gpu_dict(colour="green")]}, "gpus[0].colour", "not a field of GpuInfo"),
        ({"gpus": [7]}, "gpus[0]", "GpuInfo must be a JSON object"),
        ({"timestamp": -1}, "timestamp", "timestamp must be between 0"),
        ({"timestamp": 1.5}, "timestamp", "must be an integer, got float"),
        ({"nonce": "short"}, "nonce", "nonce must be 22-64"),
        ({"extra": 1}, "extra", "'extra' is not a field of EnrollRequest"),
    ],
)
def test_enroll_request_errors_name_the_field(
    overrides: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        EnrollRequest.from_dict(enroll_dict(**overrides))
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_enroll_request_missing_field_is_named() -> None:
    data = enroll_dict()
    del data["nonce"]
    with pytest.raises(ProtocolError, match="nonce is required"):
        EnrollRequest.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"allowed_ips": []}, "allowed_ips", "must not be empty"),
        ({"allowed_ips": "10.0.0.1/32"}, "allowed_ips", "must be a list"),
        ({"allowed_ips": ["10.100.128.9"]}, "allowed_ips[0]", r"must be written '10.100.128.9/32'"),
        ({"allowed_ips": ["10.100.2.0/20"]}, "allowed_ips[0]", "has host bits set"),
        ({"allowed_ips": ["10.100.128.9/32", "banana"]}, "allowed_ips[1]", "banana"),
        ({"allowed_ips": ["FD00::/64"]}, "allowed_ips[0]", "must be written 'fd00::/64'"),
        ({"allowed_ips": ["10.0.0.1/32", "10.0.0.1/32"]}, "allowed_ips", "duplicates"),
        ({"kind": "buyer"}, "kind", "kind must be 'job' or 'mesh'"),
        ({"ref": ""}, "ref", "must not be empty"),
        ({"endpoint": "[::1]"}, "endpoint", "must be host:port"),
        ({"persistent_keepalive": 65536}, "persistent_keepalive", "between 0 and 65535"),
        ({"public_key": "AAAA"}, "public_key", "must decode to 32 bytes, got 3"),
    ],
)
def test_peer_spec_errors_name_the_field(
    overrides: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        PeerSpec.from_dict(peer_dict(**overrides))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"node_id": "node-47"}, "node_id", "node_id must be 'nd_'"),
        ({"revision": -1}, "revision", "revision must be between 0"),
        ({"issued_at": None}, "issued_at", "must be an integer, got NoneType"),
        ({"peers": [peer_dict(kind="x")]}, "peers[0].kind", r"peers\[0\].kind must be"),
        (
            {
                "peers": [
                    peer_dict(allowed_ips=["10.0.0.0/8"]),
                    peer_dict(allowed_ips=["10.0.0.0/8"]),
                ]
            },
            "peers[1].allowed_ips",
            "already routed to another peer",
        ),
    ],
)
def test_desired_state_errors_name_the_field(
    overrides: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        DesiredState.from_dict(desired_dict(**overrides))
    assert info.value.field == field


def test_desired_state_refuses_the_same_key_twice() -> None:
    key = wg_pub()
    data = desired_dict(
        peers=[
            peer_dict(public_key=key),
            peer_dict(public_key=key, allowed_ips=["10.100.128.10/32"]),
        ]
    )
    with pytest.raises(ProtocolError, match="already used by another peer") as info:
        DesiredState.from_dict(data)
    assert info.value.field == "peers[1].public_key"


def test_overlapping_but_different_networks_are_allowed() -> None:
    # WireGuard routes by longest prefix: a hub owning the /16 and a job peer owning a /32
    # inside it is the normal layout, not a conflict.
    state = DesiredState.from_dict(
        desired_dict(
            peers=[
                peer_dict(kind="mesh", allowed_ips=["10.100.0.0/16"]),
                peer_dict(allowed_ips=["10.100.128.9/32"]),
            ]
        )
    )
    assert len(state.peers) == 2


@pytest.mark.parametrize(
    "module",
    [wire, wire.signing, wire.fields, wire.schema, wire.messages, wire.channel, wire.keycert],
)
def test_module_exports_what_it_documents(module: Any) -> None:
    for name in module.__all__:
        assert hasattr(module, name), name


def test_the_package_gathers_every_public_name_of_its_modules() -> None:
    parts = (wire.signing, wire.fields, wire.messages, wire.names, wire.channel, wire.keycert)
    defined = {name: getattr(part, name) for part in parts for name in part.__all__}
    for name in wire.__all__:
        assert getattr(wire, name) is defined[name], name


# -- ack and removal report ------------------------------------------------------------------------


def _wg() -> str:
    return encode_key(generate_wireguard_keypair()[1])


def test_ack_names_the_peers_still_leaving_and_round_trips() -> None:
    a, b = _wg(), _wg()
    ack = wire.Ack(
        node_id=NODE.node_id,
        revision=4,
        results=(wire.PeerResult(a, ok=True),),
        timestamp=1_700_000_000,
        removing=(b,),
    )
    envelope = signed_envelope(ACK, ack.to_dict(), NODE)

    parsed = wire.Ack.from_dict(open_envelope(envelope, NODE.public_key, ACK))

    assert parsed == ack and parsed.removing == (b,)
    # An ack without the field (nothing leaving) is read as an empty list.
    body = ack.to_dict()
    del body["removing"]
    assert wire.Ack.from_dict(body).removing == ()


def test_ack_and_removed_refuse_bad_keys_by_name() -> None:
    a = _wg()
    with pytest.raises(ProtocolError, match=r"removing\[1\]"):
        wire.Ack(node_id=NODE.node_id, revision=1, results=(), timestamp=1, removing=(a, "nope"))
    with pytest.raises(ProtocolError, match="removing names a key twice"):
        wire.Ack(node_id=NODE.node_id, revision=1, results=(), timestamp=1, removing=(a, a))
    with pytest.raises(ProtocolError, match="at least one"):
        wire.Removed(node_id=NODE.node_id, public_keys=(), timestamp=1)
    with pytest.raises(ProtocolError, match="public_keys must be a list"):
        wire.Removed.from_dict({"node_id": NODE.node_id, "public_keys": a, "timestamp": 1})


def test_removed_round_trips_through_its_signed_envelope() -> None:
    keys = (_wg(), _wg())
    removed = wire.Removed(node_id=NODE.node_id, public_keys=keys, timestamp=1_700_000_000)
    envelope = signed_envelope(REMOVED, removed.to_dict(), NODE)

    assert wire.Removed.from_dict(open_envelope(envelope, NODE.public_key, REMOVED)) == removed
    with pytest.raises(BadSignature):
        open_envelope(envelope, NODE.public_key, ACK)  # not an ack, whatever its body


def test_the_wire_contract_imports_nothing_of_the_agents_machinery_or_the_gateway() -> None:
    # The gateway imports clawnode.wire: it must not pull in pyroute2, NVML, the websocket
    # client or Django (design/architecture.md), nor the agent's system-facing modules.
    code = (
        "import sys, clawnode.wire; "
        "print(' '.join(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('pyroute2', 'pynvml', 'websockets', 'django') "
        "or m in ('subprocess', 'clawnode.backends.links', 'clawnode.daemon', 'clawnode.gpu'))))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert found == []
