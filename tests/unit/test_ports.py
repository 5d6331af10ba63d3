from __future__ import annotations

import socket

import pytest

from tests.ports import _ephemeral_start, unused_port

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_a_test_port_is_never_a_client_source_port(kind):
    # a port in the ephemeral range can be a poll's own source port: it then connects to itself
    port = unused_port(kind)
    assert 20000 <= port < _ephemeral_start()
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", port))  # and it is free
