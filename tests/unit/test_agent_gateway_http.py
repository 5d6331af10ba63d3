"""The agent's enrolment call (clawnode.gateway_http) against small local HTTP(S) servers that
answer the way a gateway can: refusals with a "detail", server errors, redirects, bad TLS.

The real gateway is exercised end to end in tests/integration/test_clawnode_join.py.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from clawnode import wire
from clawnode.gateway_http import (
    ENROLL_PATH,
    GatewayError,
    build_enroll_envelope,
    enroll,
)
from clawnode.keys import Identity

from tests.ports import unused_port

pytestmark = [pytest.mark.unit]

TOKEN = "molt_enr_do-not-print-me"


class Canned:
    """What the server answers, and what it received."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {"Content-Type": "application/json"}
        self.requests: list[tuple[str, dict[str, str], bytes]] = []


@contextmanager
def server(canned: Canned, *, tls_context: ssl.SSLContext | None = None) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            canned.requests.append((self.path, dict(self.headers), self.rfile.read(length)))
            self.send_response(canned.status)
            for name, value in canned.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(canned.body)))
            self.end_headers()
            self.wfile.write(canned.body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls_context is not None:
        httpd.socket = tls_context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def envelope(identity: Identity) -> dict:
    return build_enroll_envelope(
        identity, TOKEN, hostname="gpu-box", listen_port=51820, endpoint="", gpus=()
    )


def answer(identity: Identity, **overrides) -> bytes:
    data = {
        "node_id": identity.node_id,
        "name": "node-47",
        "mesh_address": "10.100.128.47",
        "gateway_public_key": Identity.generate().public_key_b64,
        "websocket_url": "ws://gw.example/ws/agent/",
    }
    data.update(overrides)
    return json.dumps(data).encode()


def test_enrolment_posts_a_signed_envelope_and_returns_the_node():
    identity = Identity.generate()
    canned = Canned(201, answer(identity))

    with server(canned) as url:
        response = enroll(url, envelope(identity), identity)

    assert (response.name, response.mesh_address) == ("node-47", "10.100.128.47")
    assert (response.mesh_network, response.job_network) == ("", "")  # an older gateway's answer
    path, headers, body = canned.requests[0]
    assert path == ENROLL_PATH
    assert headers["Content-Type"] == "application/json"
    sent = json.loads(body)
    # The gateway can check it: signed by the identity whose key the body carries.
    opened = wire.open_envelope(sent, identity.public_key, wire.ENROLL)
    assert opened["token"] == TOKEN
    assert TOKEN not in path and TOKEN not in json.dumps(headers)


def test_the_answer_names_the_mesh_and_job_networks():
    identity = Identity.generate()
    canned = Canned(
        201, answer(identity, mesh_network="10.100.128.0/17", job_network="10.64.0.0/11")
    )

    with server(canned) as url:
        response = enroll(url, envelope(identity), identity)

    assert (response.mesh_network, response.job_network) == ("10.100.128.0/17", "10.64.0.0/11")


def test_a_refusal_shows_the_gateways_detail():
    identity = Identity.generate()
    canned = Canned(403, b'{"detail": "enrolment token was already used"}')

    with server(canned) as url, pytest.raises(GatewayError) as info:
        enroll(url, envelope(identity), identity)

    assert str(info.value) == (
        "gateway refused the enrolment (HTTP 403): enrolment token was already used"
    )
    assert info.value.status == 403
    assert TOKEN not in str(info.value)


def test_field_errors_are_shown_when_there_is_no_detail():
    identity = Identity.generate()
    canned = Canned(400, b'{"body": ["This field is required."]}')

    with server(canned) as url, pytest.raises(GatewayError, match="body: This field is required"):
        enroll(url, envelope(identity), identity)


def test_a_server_error_page_is_summarized():
    identity = Identity.generate()
    canned = Canned(502, b"<html>\n  Bad   gateway\n</html>", {"Content-Type": "text/html"})

    with server(canned) as url, pytest.raises(GatewayError) as info:
        enroll(url, envelope(identity), identity)

    assert "failed while handling the enrolment (HTTP 502)" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_redirect_is_reported_not_followed():
    identity = Identity.generate()
    canned = Canned(301, b"", {"Location": "https://molt.example/api/v1/nodes/enroll/"})

    with server(canned) as url, pytest.raises(GatewayError, match=r"redirected .* \(HTTP 301\)"):
        enroll(url, envelope(identity), identity)

    assert len(canned.requests) == 1


def test_an_answer_for_another_node_is_refused():
    identity = Identity.generate()
    canned = Canned(201, answer(identity, node_id=Identity.generate().node_id))

    with server(canned) as url, pytest.raises(GatewayError, match="but this machine is"):
        enroll(url, envelope(identity), identity)


def test_an_answer_that_is_not_json_is_refused():
    identity = Identity.generate()
    canned = Canned(200, b"<html>hello</html>", {"Content-Type": "text/html"})

    with server(canned) as url, pytest.raises(GatewayError, match="did not answer with JSON"):
        enroll(url, envelope(identity), identity)


def test_connection_refused_is_one_clear_line():
    port = unused_port()  # nothing listens there
    identity = Identity.generate()

    with pytest.raises(GatewayError) as info:
        enroll(f"http://127.0.0.1:{port}", envelope(identity), identity)

    assert str(info.value) == (
        f"cannot reach gateway http://127.0.0.1:{port}: connection refused "
        "(is it running on that port?)"
    )


def test_an_untrusted_tls_certificate_is_a_clear_error(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    identity = Identity.generate()
    canned = Canned(201, answer(identity))

    with server(canned, tls_context=context) as url, pytest.raises(GatewayError) as info:
        enroll(url, envelope(identity), identity)

    assert str(info.value).startswith(f"TLS certificate of {url} could not be verified")
    assert "self-signed" in str(info.value)
    assert canned.requests == []  # nothing was sent to an unverified server


def test_the_envelope_carries_the_identitys_keys_and_fresh_nonces():
    identity = Identity.generate()

    one, two = envelope(identity), envelope(identity)

    assert one["body"]["identity_public_key"] == identity.public_key_b64
    assert one["body"]["wireguard_public_key"] == identity.wireguard_public_key_b64
    assert one["body"]["nonce"] != two["body"]["nonce"]
    assert base64.b64decode(one["signature"])
