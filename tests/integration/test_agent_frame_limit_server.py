"""The web process started as `make run` starts it (Procfile.dev's web line, run by a shell as
honcho does) refuses an agent's websocket frame over 1 MiB itself, before the application sees
it: its own limit is 16 MiB unless --ws-max-size says otherwise. The consumer's limits are
raised out of the way here, so only the server can refuse."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
import websockets
from clawnode import wire
from django.conf import settings as django_settings

from tests.conftest import REPO
from tests.integration.conftest import BIN, Gateway, database_url, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def web_command() -> str:
    line = next(
        line for line in (REPO / "Procfile.dev").read_text().splitlines() if line.startswith("web:")
    )
    return line.removeprefix("web:").strip()


def test_every_way_the_web_process_starts_caps_frames_and_declines_deflate():
    limit = str(django_settings.MOLT_AGENT_MAX_FRAME_BYTES)
    assert re.search(rf"--ws-max-size {limit} --ws-per-message-deflate false\b", web_command())
    compose = (REPO / "docker" / "compose.yaml").read_text()
    assert re.search(rf'- --ws-max-size\n\s+- "{limit}"\n', compose)
    assert re.search(r'- --ws-per-message-deflate\n\s+- "false"\n', compose)
    dockerfile = (REPO / "docker" / "Dockerfile.gateway").read_text()
    assert f'"--ws-max-size", "{limit}", "--ws-per-message-deflate", "false"]' in dockerfile


def test_the_server_itself_closes_a_frame_over_a_mebibyte_1009(transactional_db, tmp_path):
    port = free_port()
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DJANGO_DEBUG": "true",
        "DATABASE_URL": database_url(),
        "MOLT_STATE_DIR": str(tmp_path / "state"),
        "ALLOWED_HOSTS": "127.0.0.1",
        # The consumer would take 16 MiB: whatever refuses a 2 MiB frame is the server.
        "MOLT_AGENT_PREAUTH_MAX_BYTES": str(16 << 20),
        "MOLT_AGENT_MAX_FRAME_BYTES": str(16 << 20),
    }
    gw = Gateway(base_url=f"http://127.0.0.1:{port}", env=env, log_dir=tmp_path)
    gw.start("web", ["bash", "-c", web_command()])

    def up() -> bool:
        try:
            with urllib.request.urlopen(gw.base_url + "/healthz/", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    async def send(size: int) -> int | None:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/agent/", max_size=None) as ws:
            await ws.recv()  # the challenge
            try:
                # The server may close (1009) while the frame is still being written: the send
                # itself then raises ConnectionClosed carrying the server's close code.
                await ws.send("x" * size)
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None

    try:
        wait_until(up, timeout=40, message="uvicorn to answer /healthz/")
        # Under the server's limit, the application gets it (and refuses it: not JSON).
        assert asyncio.run(send(900_000)) == wire.CLOSE_BAD_MESSAGE
        assert asyncio.run(send(2 << 20)) == wire.CLOSE_TOO_BIG
    except BaseException:
        print(gw.logs())
        raise
    finally:
        gw.stop("web")
