"""uvicorn as docker/compose.yaml runs web (`--proxy-headers`, FORWARDED_ALLOW_IPS naming the
proxy): X-Forwarded-For is honoured on connections from the proxy's address and ignored from
any other, so login throttles count each client behind the proxy and nobody else can claim an
address (issue 15; the compose side: tests/unit/test_docker_files.py).

The server is real uvicorn with the flags compose gives it; the app only echoes the client
address uvicorn hands to ASGI, which is what Django's REMOTE_ADDR and so the throttles get.
127.0.0.1 stands for the proxy and 127.0.0.2 (also loopback on Linux) for anyone else."""

from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import free_port, wait_until

pytestmark = [pytest.mark.integration]

CLIENT = "198.51.100.7"


async def client_echo(scope, receive, send) -> None:
    """ASGI app: answers with the client address of the request."""
    if scope["type"] != "http":
        return
    body = (scope["client"] or ("", 0))[0].encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def fetch(port: int, source: str, forwarded: str | None) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/", headers={"X-Forwarded-For": forwarded} if forwarded else {})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.fixture
def server(tmp_path: Path):
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "uvicorn"),
         "tests.integration.test_forwarded_addresses:client_echo",
         "--host", "127.0.0.1", "--port", str(port), "--proxy-headers", "--log-level", "warning"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "FORWARDED_ALLOW_IPS": "127.0.0.1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip

    def up() -> bool:
        try:
            return bool(fetch(port, "127.0.0.1", None))
        except OSError:
            return False

    try:
        wait_until(up, timeout=20, message="uvicorn to answer")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_the_proxy_s_forwarded_address_is_the_client(server):
    assert fetch(server, "127.0.0.1", CLIENT) == CLIENT
    # A hop the client itself wrote in front is not believed: the proxy appended the real one.
    assert fetch(server, "127.0.0.1", f"203.0.113.9, {CLIENT}") == CLIENT


def test_anyone_else_s_forwarded_header_is_ignored(server):
    assert fetch(server, "127.0.0.2", CLIENT) == "127.0.0.2"
    assert fetch(server, "127.0.0.2", None) == "127.0.0.2"
