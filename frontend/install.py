"""The provider install line: `GET /install.sh` and the agent package it installs.

`curl -fsSL GATEWAY/install.sh | sudo sh -s -- --token T` downloads the script below with this
gateway's URL written into it; the script downloads the clawnode wheel from `/agent/`, checks
its SHA-256 (also written into the script) and installs it into a virtualenv.

The wheel is built from provider_agent/ by frontend.wheel, not by pip or setuptools (why is
there). It is built once per source digest and cached under MOLT_STATE_DIR: a request only
hashes the sources (under 200 KB) to find it (about a millisecond).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.utils.html import escape
from django.views.decorators.http import require_GET

from frontend.wheel import build_wheel_bytes, read_project, source_digest

SCRIPT_TEMPLATE = Path(__file__).resolve().parent / "templates/frontend/provider/install.sh"


def agent_source_dir() -> Path:
    return Path(settings.BASE_DIR) / "provider_agent"


@dataclass(frozen=True)
class AgentWheel:
    path: Path
    filename: str
    version: str
    sha256: str


def agent_wheel(source: Path | None = None, cache_root: Path | None = None) -> AgentWheel:
    """The agent wheel for the current sources, built on first use and cached under
    MOLT_STATE_DIR/agent/<digest>/. Concurrent first requests may both build: each writes a
    temporary file and renames it into place, and both produce the same bytes."""
    source = source or agent_source_dir()
    cache_root = cache_root or Path(settings.MOLT_STATE_DIR) / "agent"
    project = read_project(source)
    directory = cache_root / source_digest(source)[:32]
    path = directory / project.wheel_filename
    if not path.exists():
        _, data = build_wheel_bytes(source)
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return AgentWheel(
        path=path, filename=project.wheel_filename, version=project.version, sha256=sha256
    )


# --- views ---------------------------------------------------------------------------------------


def gateway_url(request: HttpRequest) -> str:
    """This gateway's base URL as the provider's machine should reach it: the URL the script
    was requested from (scheme from SECURE_PROXY_SSL_HEADER behind a TLS proxy; the host has
    passed ALLOWED_HOSTS)."""
    return request.build_absolute_uri("/").rstrip("/")


def render_install_script(gateway: str, wheel: AgentWheel) -> str:
    """The script with this gateway's values filled in, each quoted for the shell."""
    values = {
        "@GATEWAY@": shlex.quote(gateway),
        "@AGENT_VERSION@": shlex.quote(wheel.version),
        "@AGENT_WHEEL@": shlex.quote(wheel.filename),
        "@AGENT_SHA256@": shlex.quote(wheel.sha256),
    }
    script = SCRIPT_TEMPLATE.read_text()
    for marker, value in values.items():
        script = script.replace(marker, value)
    return script


@require_GET
def install_script(request: HttpRequest) -> HttpResponse:
    script = render_install_script(gateway_url(request), agent_wheel())
    response = HttpResponse(script, content_type="text/x-shellscript; charset=utf-8")
    # The script names one build of the agent by its hash; a cached copy would install an old one.
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def agent_index(request: HttpRequest) -> HttpResponse:
    """A find-links page (pip install --find-links GATEWAY/agent/ clawnode)."""
    wheel = agent_wheel()
    name = escape(wheel.filename)
    html = (
        "<!doctype html><html><head><title>clawnode</title></head><body>\n"
        f'<a href="{name}#sha256={wheel.sha256}">{name}</a>\n'
        "</body></html>\n"
    )
    return HttpResponse(html)


@require_GET
def agent_package(request: HttpRequest, filename: str) -> FileResponse:
    wheel = agent_wheel()
    if filename != wheel.filename:
        raise Http404(f"this gateway serves {wheel.filename}")
    response = FileResponse(
        wheel.path.open("rb"),
        as_attachment=True,
        filename=wheel.filename,
        content_type="application/zip",
    )
    response["ETag"] = f'"{wheel.sha256}"'
    return response
