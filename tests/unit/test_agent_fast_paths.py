"""The agent's fast paths decide exactly as the slow, obvious code they stand in for.

The hot paths of a reconcile at a thousand peers skip ``ipaddress`` for canonical IPv4 text
(clawnode.cidr), skip building error paths for valid JSON (wire.canonical_bytes), parse only
the peers asked for in a UAPI reply, from its raw bytes (backends.uapi.parse_uapi_peers), and plan
without sorting every key or comparing unchanged peers field by field (reconcile.plan). Each is
checked here against the straightforward computation, on generated input that includes the
awkward cases.
"""

from __future__ import annotations

import ipaddress
import json
import string
import unicodedata
from typing import Any

import pytest
from clawnode import reconcile, wire
from clawnode.backends.base import PeerStatus
from clawnode.backends.memory import FakeBackend
from clawnode.backends.uapi import key_to_hex, parse_uapi_get, parse_uapi_peers
from clawnode.cidr import ipv4_network_key, sorted_networks
from clawnode.keys import encode_key, generate_wireguard_keypair
from clawnode.wire import DESIRED_STATE, PeerSpec, ProtocolError, canonical_bytes, signing
from hypothesis import example, given
from hypothesis import strategies as st

pytestmark = [pytest.mark.unit]


def wg_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


# -- canonical IPv4 networks without ipaddress ----------------------------------------------------


def strict_canonical(text: str) -> bool:
    """The definition: ipaddress accepts it as a strict IPv4 network and writes it the same."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError):
        return False
    return network.version == 4 and str(network) == text


octet_text = st.one_of(
    st.integers(0, 255).map(str),
    # "\u0663" is ARABIC-INDIC DIGIT THREE: str.isdigit() says yes, ipaddress says no.
    st.sampled_from(["00", "01", "007", "256", "999", "-1", "", " 1", "1 ", "\u0663", "0x1"]),
)
prefix_text = st.one_of(
    st.integers(0, 32).map(str), st.sampled_from(["33", "08", "", "255.0.0.0", "-0", "\u0661"])
)
ipv4ish = st.builds(
    lambda a, b, c, d, p, slash: f"{a}.{b}.{c}.{d}{slash}{p}",
    octet_text,
    octet_text,
    octet_text,
    octet_text,
    prefix_text,
    st.sampled_from(["/", "/", "/", "", "//"]),
)
canonical_ipv4 = st.builds(
    lambda value, prefix: str(
        ipaddress.ip_network((value >> (32 - prefix) << (32 - prefix), prefix))
    ),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)


@given(st.one_of(ipv4ish, canonical_ipv4, st.text(alphabet="0123456789./: abcdef", max_size=20)))
@example("10.100.128.9/32")
@example("10.100.128.9/24")  # host bits set
@example("0.0.0.0/0")
@example("255.255.255.255/32")
@example("10.0.0.0/8\n")
@example("::/0")
def test_ipv4_fast_path_recognises_exactly_the_strict_canonical_networks(text: str) -> None:
    key = ipv4_network_key(text)

    assert (key is not None) == strict_canonical(text)
    if key is not None:
        network = ipaddress.IPv4Network(text)
        assert key == (int(network.network_address), network.prefixlen)


def reference_sorted(networks: list[str]) -> tuple[str, ...]:
    parsed = {ipaddress.ip_network(n, strict=False) for n in networks}
    return tuple(str(n) for n in sorted(parsed, key=lambda n: (n.version, n)))


any_network = st.one_of(
    canonical_ipv4,
    st.builds(
        lambda value, prefix: f"{ipaddress.IPv4Address(value)}/{prefix}",  # host bits kept
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda value, prefix: f"{ipaddress.IPv6Address(value)}/{prefix}",
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)


@given(st.lists(any_network, max_size=6))
def test_sorted_networks_match_ipaddress_order_and_spelling(networks: list[str]) -> None:
    assert sorted_networks(networks) == reference_sorted(networks)


@given(st.one_of(ipv4ish, canonical_ipv4))
def test_peer_spec_accepts_an_allowed_ip_exactly_when_it_is_written_canonically(text: str) -> None:
    try:
        PeerSpec(public_key=wg_key(), allowed_ips=(text,), kind="job", ref="order-1")
    except ProtocolError as exc:
        assert not strict_canonical(text), exc
        assert exc.field == "allowed_ips[0]"
    else:
        assert strict_canonical(text)


# -- canonical JSON: the valid path builds no error paths, and refuses what it refused -----------


def full_check(body: dict[str, Any]) -> str | None:
    """What the complete, path-naming check says about ``body`` (None: acceptable)."""
    try:
        signing._check_json_value(body, "body", 0)
    except ProtocolError as exc:
        return str(exc)
    return None


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53) - 2, 2**53 + 2),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["\ud800", "ok\udfff", "é", "\x00"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), children, max_size=4),
        st.dictionaries(st.sampled_from([1, None, "\udc80", "k"]), children, max_size=2),
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
@example({"deep": nested(31)})
@example({"deep": nested(32)})
@example({"deep": nested(33)})
@example({"empty": [[[]]]})
@example({"big": 2**53 - 1, "bigger": [2**53]})
@example({"s": "\ud800"})
@example({"\ud800": 1})
def test_canonical_bytes_refuses_exactly_what_the_full_check_refuses(body: dict[str, Any]) -> None:
    verdict = full_check(body)

    if verdict is None:
        text = json.dumps(
            body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        assert canonical_bytes(DESIRED_STATE, body) == DESIRED_STATE.encode() + b"\n" + (
            text.encode("utf-8")
        )
    else:
        with pytest.raises(ProtocolError) as info:
            canonical_bytes(DESIRED_STATE, body)
        assert str(info.value) == verdict


@given(st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=12))
@example("tab\there")
@example("del\x7f")
@example("nbsp\u00a0 and é are fine")
@example("soft\u00adhyphen")
def test_string_fields_refuse_exactly_the_c0_controls_del_and_format_characters(text: str) -> None:
    has_control = any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    has_format = any(unicodedata.category(c) == "Cf" for c in text)  # U+00AD, U+0600-U+0605...
    try:
        PeerSpec(public_key=wg_key(), allowed_ips=("10.0.0.1/32",), kind="job", ref=text or "r")
    except ProtocolError as exc:
        if has_control:
            assert "control characters" in str(exc), exc
        else:
            assert has_format and "invisible format character" in str(exc), exc
    else:
        assert not has_control and not has_format


def test_unknown_and_missing_fields_are_still_named() -> None:
    good = PeerSpec(wg_key(), ("10.0.0.1/32",), "job", "r").to_dict()

    with pytest.raises(ProtocolError, match="'extra' is not a field of PeerSpec"):
        PeerSpec.from_dict({**good, "extra": 1})
    del good["ref"]
    with pytest.raises(ProtocolError, match="ref is required"):
        PeerSpec.from_dict(good)


# -- reading only some peers of a UAPI reply ------------------------------------------------------


def uapi_reply(peers: dict[str, list[str]]) -> str:
    lines = ["private_key=" + "11" * 32, "listen_port=51820"]
    for i, (key, allowed) in enumerate(peers.items()):
        lines += [
            f"public_key={key_to_hex(key)}",
            "preshared_key=" + "00" * 32,
            "protocol_version=1",
            f"endpoint=198.51.100.{i + 1}:51820",
            f"last_handshake_time_sec={1_700_000_000 + i}",
            "last_handshake_time_nsec=0",
            f"tx_bytes={i * 1000}",
            f"rx_bytes={i * 2000 + 7}",
            f"persistent_keepalive_interval={i % 3}",
            *(f"allowed_ip={a}" for a in allowed),
        ]
    return "\n".join(lines)


def test_reading_some_peers_parses_the_same_as_reading_them_all() -> None:
    keys = [wg_key() for _ in range(6)]
    reply = uapi_reply(
        {k: [f"10.100.{i}.0/24", f"10.99.0.{i}/32"] if i % 2 else [] for i, k in enumerate(keys)}
    )
    absent = wg_key()
    _, everything = parse_uapi_get(reply)

    wanted = [keys[0], keys[3], keys[5], absent]
    some = parse_uapi_peers(reply, wanted)

    assert some == {k: everything[k] for k in (keys[0], keys[3], keys[5])}
    assert some[keys[5]].rx_bytes == 5 * 2000 + 7  # the last peer: its part runs to the end
    assert some[keys[3]].allowed_ips == ("10.99.0.3/32", "10.100.3.0/24")


@given(
    st.lists(st.booleans(), min_size=1, max_size=8),
    st.lists(st.integers(0, 7), max_size=4),
    st.binary(max_size=6),
)
def test_reading_some_peers_from_the_raw_bytes_parses_as_the_whole_decoded_reply(
    multi: list[bool], picks: list[int], junk: bytes
) -> None:
    # The agent takes the last counters of a peer it removes from the reply's bytes, decoding
    # only that peer's part; the reply may hold anything wireguard-go writes, even bytes that
    # are not UTF-8 (here, in a device field before the peers).
    keys = [wg_key() for _ in multi]
    text = uapi_reply(
        {
            k: ["10.100.1.0/24", f"10.99.0.{i}/32"] if m else []
            for i, (k, m) in enumerate(zip(keys, multi, strict=True))
        }
    )
    head, _, rest = text.partition("\n")
    raw = head.encode() + b"\nfwmark=" + junk.replace(b"\n", b"") + b"\n" + rest.encode()
    _, everything = parse_uapi_get(raw.decode("utf-8", "replace"))
    wanted = [keys[i % len(keys)] for i in picks] + [wg_key()]

    some = parse_uapi_peers(raw, wanted)

    assert some == {k: everything[k] for k in wanted if k in everything}
    assert some == parse_uapi_peers(bytearray(raw), wanted)


def test_a_key_that_appears_inside_another_line_is_not_taken_for_a_peer() -> None:
    one, other = wg_key(), wg_key()
    # A device field that happens to hold the hex of a key (a preshared key equal to it): only a
    # whole `public_key=` line starts a peer.
    reply = f"listen_port=1\npublic_key={key_to_hex(one)}\npreshared_key={key_to_hex(other)}\n"

    assert parse_uapi_peers(reply, [other]) == {}
    assert set(parse_uapi_peers(reply, [one])) == {one}
    assert parse_uapi_peers(reply.encode(), [other]) == {}
    assert set(parse_uapi_peers(reply.encode(), [one])) == {one}


def test_the_fake_backend_reads_some_peers_and_records_the_reads() -> None:
    backend = FakeBackend()
    backend.ensure_interface("molt0", b"\x01" * 32, 51820, "10.100.128.1/17")
    a, b = wg_key(), wg_key()
    backend.set_peer(a, ["10.100.128.9/32"])
    backend.set_peer(b, ["10.100.128.10/32"])
    backend.add_traffic(b, rx=10, tx=20)

    assert backend.read_peers([b, wg_key()]) == {b: backend.peers[b]}
    assert backend.calls[-2][0] == "read_peers" and backend.calls[-2][1] == b


def test_printable_ascii_is_all_a_canonical_ipv4_network_can_contain() -> None:
    # The fast path skips PeerSpec's length and control-character checks for what it accepts;
    # that is sound only because what it accepts is short printable ASCII.
    for text in ("255.255.255.255/32", "0.0.0.0/0"):
        assert ipv4_network_key(text) is not None
        assert len(text) <= 43 and set(text) <= set(string.digits + "./")


# -- a desired state parsed with the previous one: unchanged peers are not checked again ---------


class Text(str):
    """A str subclass: equal to its text, but not what JSON gives."""


PEER_MUTATIONS: dict[str, Any] = {
    "unchanged": lambda d, other: d,
    "keepalive True for 1": lambda d, other: {**d, "persistent_keepalive": True},
    "keepalive as a float": lambda d, other: {**d, "persistent_keepalive": 1.0},
    "keepalive as text": lambda d, other: {**d, "persistent_keepalive": "1"},
    "keepalive out of range": lambda d, other: {**d, "persistent_keepalive": 70000},
    "allowed IPs as a tuple": lambda d, other: {**d, "allowed_ips": tuple(d["allowed_ips"])},
    "allowed IP as a str subclass": lambda d, other: {
        **d,
        "allowed_ips": [Text(t) for t in d["allowed_ips"]],
    },
    "allowed IP host bits": lambda d, other: {**d, "allowed_ips": ["10.9.9.9/24"]},
    "allowed IPs empty": lambda d, other: {**d, "allowed_ips": []},
    "another network": lambda d, other: {**d, "allowed_ips": ["10.9.9.0/24"]},
    "kind mesh": lambda d, other: {**d, "kind": "mesh"},
    "kind unknown": lambda d, other: {**d, "kind": "JOB"},
    "ref changed": lambda d, other: {**d, "ref": "order-other"},
    "ref with a newline": lambda d, other: {**d, "ref": "order\n"},
    "endpoint set": lambda d, other: {**d, "endpoint": "198.51.100.7:51820"},
    "endpoint bad": lambda d, other: {**d, "endpoint": "nowhere"},
    "endpoint left out": lambda d, other: {k: v for k, v in d.items() if k != "endpoint"},
    "ref left out": lambda d, other: {k: v for k, v in d.items() if k != "ref"},
    "extra field": lambda d, other: {**d, "note": "x"},
    "another peer's key": lambda d, other: {**d, "public_key": other["public_key"]},
    "key not a string": lambda d, other: {**d, "public_key": [d["public_key"]]},
    "not an object": lambda d, other: [d],
}


def parse_outcome(body: dict[str, Any], known: wire.DesiredState | None) -> Any:
    try:
        return wire.DesiredState.from_dict(body, known=known)
    except ProtocolError as exc:
        return ("refused", str(exc), exc.field)


@pytest.mark.parametrize("mutation", sorted(PEER_MUTATIONS))
def test_parsing_with_the_previous_state_accepts_and_refuses_the_same(mutation: str) -> None:
    previous = wire.DesiredState(
        node_id="nd_" + "ab" * 16,
        revision=1,
        peers=(
            PeerSpec(wg_key(), ("10.100.128.9/32",), "job", "order-1", persistent_keepalive=1),
            PeerSpec(wg_key(), ("10.100.128.10/32", "10.8.0.0/16"), "mesh", "nd_x", "h.example:1"),
        ),
        issued_at=1_700_000_000,
    )
    body = previous.to_dict()
    body["revision"] = 2
    first, second = body["peers"]
    body["peers"] = [PEER_MUTATIONS[mutation](first, second), second]

    with_previous = parse_outcome(body, previous)

    assert with_previous == parse_outcome(body, None)
    if mutation == "unchanged":
        # Taken from the previous state, not checked again (the point of it).
        assert with_previous.peers[0] is previous.peers[0]
    if mutation == "keepalive True for 1":
        assert with_previous[0] == "refused"


# -- planning without sorting every key ------------------------------------------------------------


def reference_plan(
    desired: wire.DesiredState, actual: dict[str, PeerStatus]
) -> list[reconcile.Action]:
    """The plan as first written: every key on both sides sorted, every peer compared."""
    wanted = {spec.public_key: spec for spec in desired.peers}
    removes: list[reconcile.Action] = [
        reconcile.Retire(key)
        for key in sorted(actual)
        if key not in wanted and (actual[key].allowed_ips or actual[key].persistent_keepalive)
    ]
    updates: list[reconcile.Action] = []
    adds: list[reconcile.Action] = []
    for key in sorted(wanted):
        spec = wanted[key]
        status = actual.get(key)
        if status is None:
            adds.append(
                reconcile.Add(key, spec.allowed_ips, spec.endpoint, spec.persistent_keepalive)
            )
            continue
        changed = reconcile._changes(spec, status)
        if changed:
            updates.append(
                reconcile.Update(
                    key, spec.allowed_ips, spec.endpoint, spec.persistent_keepalive, changed
                )
            )
    return removes + updates + adds


PLAN_KEYS = [wg_key() for _ in range(6)]
networks_pool = st.sampled_from(
    ["10.100.128.9/32", "10.100.128.10/32", "10.200.0.0/24", "fd00::/64", "fd00:0::1/128"]
)
endpoints_pool = st.sampled_from(
    ["", "203.0.113.5:51820", "203.0.113.5:40000", "[2001:db8::1]:51820", "node.example:51820"]
)
actual_endpoints = st.sampled_from(
    ["", "203.0.113.5:51820", "203.0.113.5:40000", "[2001:db8:0::1]:51820", "nonsense"]
)


@st.composite
def plan_inputs(draw: Any) -> tuple[wire.DesiredState, dict[str, PeerStatus]]:
    desired_keys = draw(st.lists(st.sampled_from(PLAN_KEYS), unique=True, max_size=6))
    # Each network on one desired peer at most (DesiredState refuses a network routed twice),
    # one or two a peer, in either order (the device writes them sorted).
    networks = draw(st.permutations([f"10.100.128.{i}/32" for i in range(8)] + [
        "10.200.0.0/24", "10.201.0.0/16", "fd00::/64", "fd01::/64"]))  # fmt: skip
    specs = []
    for i, key in enumerate(desired_keys):
        allowed = tuple(networks[2 * i : 2 * i + draw(st.integers(1, 2))])
        keepalive = draw(st.sampled_from([0, 25]))
        specs.append(PeerSpec(key, allowed, "job", f"r{i}", draw(endpoints_pool), keepalive))
    actual = {}
    for key in draw(st.lists(st.sampled_from(PLAN_KEYS), unique=True, max_size=6)):
        same = next((spec for spec in specs if spec.public_key == key), None)
        if same is not None and draw(st.booleans()):
            allowed = sorted_networks(same.allowed_ips)  # as the device writes them
        else:
            allowed = sorted_networks(draw(st.lists(networks_pool, unique=True, max_size=3)))
        keepalive = draw(st.sampled_from([0, 25]))
        actual[key] = PeerStatus(
            key, allowed, draw(actual_endpoints), persistent_keepalive=keepalive
        )
    desired = wire.DesiredState(
        node_id="nd_" + "ab" * 16, revision=1, peers=tuple(specs), issued_at=1
    )
    return desired, actual


@given(plan_inputs())
def test_plan_gives_the_actions_of_the_plan_that_sorted_and_compared_everything(
    inputs: tuple[wire.DesiredState, dict[str, PeerStatus]],
) -> None:
    desired, actual = inputs

    assert reconcile.plan(desired, actual) == reference_plan(desired, actual)
