"""The install line, for real: `curl -fsSL GATEWAY/install.sh | sh -s -- --token T` in a network
namespace against the live gateway (uvicorn and a Celery worker on the testbed bridge), as root
with the environment sudo would give it. It creates a virtualenv, installs the wheel the gateway
serves, joins, and prints each step; a failing step says which and why and exits non-zero.

The namespace has no way out of the machine, so clawnode's dependencies come from a local
wheelhouse (--find-links, as on an air-gapped machine) built from this virtualenv's installed
distributions; there is no systemd here, so --no-systemd; the packages apt would install are
already on the machine, so --skip-apt."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from frontend.install import agent_source_dir
from meshnet.enrolment import create_enrollment_token
from meshnet.models import Node
from tests.integration.conftest import running_gateway
from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

# What `sudo sh` would run with: a plain system PATH, nothing of this test's environment.
CLEAN_ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME=/root", "LANG=C.UTF-8"]  # fmt: skip
STEP_LINE = re.compile(r"^\[(\d)/6\] (.*)$", re.M)


# --- a wheelhouse of clawnode's dependencies, from what this virtualenv has installed ------------

_SKIP_IN_DIST_INFO = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_of_installed(name: str, out: Path) -> Path:
    """Pack an installed distribution back into a wheel: its files as its RECORD lists them
    (scripts outside site-packages left out; pip writes console scripts itself), a fresh
    RECORD, and the file name from its WHEEL tags."""
    dist = importlib.metadata.distribution(name)
    root = Path(dist.locate_file(""))
    tags = [line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines()
            if line.startswith("Tag:")]  # fmt: skip
    dist_info = next(
        str(f).split("/")[0] for f in dist.files if str(f).split("/")[0].endswith(".dist-info")
    )
    entries = []
    for file in dist.files:
        path = str(file)
        if path.startswith("..") or "__pycache__" in path or path.endswith(".pyc"):
            continue
        if path.startswith(dist_info + "/") and path.split("/", 1)[1] in _SKIP_IN_DIST_INFO:
            continue
        entries.append((path, (root / path).read_bytes()))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, data in entries:
        writer.writerow([path, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries.append((f"{dist_info}/RECORD", record.getvalue().encode()))
    filename = f"{re.sub(r'[-_.]+', '_', dist.metadata['Name'])}-{dist.version}-{tags[0]}.whl"
    with zipfile.ZipFile(out / filename, "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in entries:
            wheel.writestr(path, data)
    return out / filename


def build_wheelhouse(out: Path) -> Path:
    """Wheels of clawnode's dependencies and theirs, as this interpreter resolves them."""
    out.mkdir(parents=True, exist_ok=True)
    project = tomllib.loads((agent_source_dir() / "pyproject.toml").read_text())["project"]
    pending = [Requirement(text) for text in project["dependencies"]]
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if key in seen:
            continue
        seen.add(key)
        wheel_of_installed(requirement.name, out)
        dist = importlib.metadata.distribution(requirement.name)
        pending += [Requirement(text) for text in dist.requires or []]
    return out


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


# --- running the install line in a namespace -----------------------------------------------------


def install_line(bed, ns: str, base_url: str, args: str, timeout: float = 300):
    """`curl -fsSL BASE/install.sh | sh -s -- ARGS` in `ns`, as root, with a clean environment."""
    # The gateway is at a veth address of the test bed, plain http: --insecure says that is meant.
    pipeline = f"curl -fsSL {base_url}/install.sh | sh -s -- --insecure {args}"
    return subprocess.run(
        ["ip", "netns", "exec", ns, *CLEAN_ENV, "sh", "-c", pipeline],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def provider(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-pass-123")


def test_the_install_line_installs_the_agent_joins_and_prints_every_step(
    tmp_path, settings, wheelhouse, provider
):
    prefix = tmp_path / "clawnode"
    with network_testbed() as bed:
        ns = bed.namespace("inst")
        bed.attach(ns)
        with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
            token = create_enrollment_token(provider).token
            args = (f"--token {token} --skip-apt --no-systemd --prefix {prefix} "
                    f"--find-links {wheelhouse} -- --simulated-gpus 'RTX 4090:2'")  # fmt: skip

            result = install_line(bed, ns, gateway.base_url, args)
            output = result.stdout
            assert result.returncode == 0, output + result.stderr + gateway.logs()

            steps = STEP_LINE.findall(output)
            assert [int(number) for number, _ in steps] == [1, 2, 3, 4, 5, 6]
            assert steps[2][1] == f"creating virtualenv in {prefix}"
            assert steps[3][1].startswith(f"installing clawnode 0.1.0 from {gateway.base_url}")
            assert steps[4][1] == f"joining the mesh at {gateway.base_url}"
            assert steps[5][1] == "systemd unit: skipped (--no-systemd)"
            last = output.strip().splitlines()[-1]
            joined = re.fullmatch(r"done: (node-\d+) joined the mesh at (10\.100\.\d+\.\d+)", last)
            assert joined, output
            # How to start it by hand, with the simulated GPUs it joined with.
            assert (f'{prefix}/bin/clawnode run --state-dir {prefix}/state '
                    f'--simulated-gpus "RTX 4090:2"') in output  # fmt: skip

            node = Node.objects.get(name=joined.group(1))
            assert node.owner == provider and node.mesh_address == joined.group(2)
            assert sorted(node.gpus.values_list("name", "simulated")) == [("RTX 4090", True)] * 2
            # The virtualenv and the state are under the prefix; the agent runs from it.
            status = bed.exec(ns, str(prefix / "bin" / "clawnode"), "status",
                              "--state-dir", str(prefix / "state"), check=False)  # fmt: skip
            assert f"node: {node.name} at {node.mesh_address}" in status.stdout
            assert (prefix / "state").is_dir()
            assert shutil.which("clawnode", path=str(prefix / "bin"))

            # Running it again is safe: the machine stays enrolled as the same node.
            again = install_line(bed, ns, gateway.base_url, args)
            assert again.returncode == 0, again.stdout + again.stderr
            assert "already enrolled" in again.stdout
            assert again.stdout.strip().splitlines()[-1] == last
            assert Node.objects.filter(owner=provider).count() == 1

            # Without --no-systemd, a machine without systemd stops at the last step, saying so.
            # (Only where systemd is not running: elsewhere this would install a real unit.)
            if not Path("/run/systemd/system").exists():
                unit = install_line(bed, ns, gateway.base_url, args.replace(" --no-systemd", ""))
                assert unit.returncode != 0
                assert STEP_LINE.findall(unit.stdout)[-1] == (
                    "6",
                    "installing and starting clawnode.service",
                )
                assert "systemd is not running here: re-run with --no-systemd" in unit.stderr
                assert "clawnode install failed at step [6/6]" in unit.stderr


def test_a_refused_token_fails_at_the_join_step_and_says_why(
    tmp_path, settings, wheelhouse, provider
):
    prefix = tmp_path / "clawnode"
    with network_testbed() as bed:
        ns = bed.namespace("insb")
        bed.attach(ns)
        with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
            args = (f"--token molt_enr_not-a-token --skip-apt --no-systemd --prefix {prefix} "
                    f"--find-links {wheelhouse}")  # fmt: skip

            result = install_line(bed, ns, gateway.base_url, args)

    assert result.returncode != 0
    assert [int(n) for n, _ in STEP_LINE.findall(result.stdout)] == [1, 2, 3, 4, 5]
    assert "unknown enrolment token" in result.stderr
    assert "clawnode install failed at step [5/6] joining the mesh" in result.stderr
    assert not Node.objects.exists()


def test_an_unreachable_gateway_fails_at_the_download_step(tmp_path, settings, wheelhouse):
    prefix = tmp_path / "clawnode"
    with network_testbed() as bed:
        ns = bed.namespace("insc")
        bed.attach(ns)
        with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
            # The script as served, told to fetch the agent from a port nobody listens on.
            args = (f"--token t --skip-apt --no-systemd --prefix {prefix} "
                    f"--gateway http://{bed.gateway_ip}:9 --find-links {wheelhouse}")  # fmt: skip
            result = install_line(bed, ns, gateway.base_url, args)

    assert result.returncode != 0
    assert [int(n) for n, _ in STEP_LINE.findall(result.stdout)] == [1, 2, 3, 4]
    assert f"could not download http://{bed.gateway_ip}:9/agent/" in result.stderr
    assert "clawnode install failed at step [4/6] installing clawnode" in result.stderr


def test_the_served_script_is_posix_sh_and_passes_shellcheck(client, tmp_path):
    path = tmp_path / "install.sh"
    path.write_bytes(client.get("/install.sh").content)

    syntax = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    dash = shutil.which("dash")
    if dash:  # Debian's /bin/sh; stricter than bash in POSIX mode
        assert subprocess.run([dash, "-n", str(path)], capture_output=True).returncode == 0
    # .ci/run installs shellcheck, so CI always lints; elsewhere the syntax checks above run
    # and the lint runs when shellcheck is there.
    from tests.conftest import CI

    if shutil.which("shellcheck") is None:
        assert not CI, "CI must lint the install script: apt-get install shellcheck"
        print("shellcheck not installed: lint skipped, syntax checked", file=sys.stderr)
        return
    lint = subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", str(path)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout
