"""meshnet.relay.wgmsg at its edges: what the keyless relay takes for a WireGuard message and
whose mac1 it checks (issue 17: each test here kills a mutant the relay's pair tests,
tests/unit/test_relay_pairs.py, let through). A separate file: test_relay_pairs.py is the
pairs' own, changing with them."""

from __future__ import annotations

import base64
import binascii
import struct

import pytest
from nacl.public import PrivateKey

from meshnet.relay import wgmsg

pytestmark = pytest.mark.unit

KEY = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
HIGH = 0xFFFF_FFF0  # WireGuard's indexes are random u32s: half of them have the top bit set


def test_indexes_with_the_top_bit_set_are_read_unsigned_in_every_kind_of_message():
    initiation = struct.pack("<II", 1, HIGH) + bytes(140)
    response = struct.pack("<III", 2, HIGH, HIGH - 1) + bytes(80)
    cookie = struct.pack("<II", 3, HIGH) + bytes(56)
    transport = struct.pack("<II", 4, HIGH) + bytes(24)
    assert wgmsg.parse(initiation) == wgmsg.Message(1, HIGH, None)
    assert wgmsg.parse(response) == wgmsg.Message(2, HIGH, HIGH - 1)
    assert wgmsg.parse(cookie) == wgmsg.Message(3, None, HIGH)
    assert wgmsg.parse(transport) == wgmsg.Message(4, None, HIGH)


def test_a_keepalive_the_smallest_transport_message_is_taken():
    # 32 bytes: header, receiver, counter and the empty packet's 16-byte tag.
    keepalive = struct.pack("<IIQ", 4, 9, 1) + bytes(16)
    assert len(keepalive) == wgmsg.TRANSPORT_MIN_SIZE
    assert wgmsg.parse(keepalive) == wgmsg.Message(4, None, 9)


def test_a_message_of_a_responses_size_is_a_response_only_if_its_type_says_so():
    for kind in (1, 3, 5):  # (4, transport data, may be of any size from 32)
        assert wgmsg.parse(struct.pack("<I", kind) + bytes(wgmsg.RESPONSE_SIZE - 4)) is None, kind


def test_a_public_key_must_be_canonical_base64_of_32_bytes():
    with pytest.raises(binascii.Error):  # not silently dropped characters: another key
        wgmsg.mac1_key("!" + KEY)
    with pytest.raises(ValueError, match=r"^a WireGuard public key is 32 bytes$"):
        wgmsg.mac1_key(base64.b64encode(bytes(31)).decode())
    assert len(wgmsg.mac1_key(KEY)) == 32


def test_an_empty_datagram_has_no_mac1_to_check():
    assert wgmsg.mac1_valid(b"", wgmsg.mac1_key(KEY))
