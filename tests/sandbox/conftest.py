"""Fixtures of the sandbox tier: real rootful podman, the test image (tests/sandbox/image.py),
simulated GPUs behind a real CDI spec, and a network namespace + veth per sandbox made here
(the agent's own network code, clawnode.sandbox.network, is proven by its own tests).

The engine's settings default to the development machines' (runc, cgroupfs, lowered ulimits:
docs/provider.md); MOLT_PODMAN_RUNTIME, MOLT_PODMAN_CGROUP_MANAGER and MOLT_PODMAN_ULIMITS
("nofile=20000,nproc=32768"; "" for none) override them on other hosts.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest
from clawnode.sandbox.cdi import CdiGpus
from clawnode.sandbox.engine import ContainerSpec
from clawnode.sandbox.podman import PodmanEngine

from tests.sandbox import image


def _ulimits() -> dict[str, int]:
    text = os.environ.get("MOLT_PODMAN_ULIMITS", "nofile=20000,nproc=32768")
    limits: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        limits[name] = int(value)
    return limits


ENGINE_OPTIONS = {
    "runtime": os.environ.get("MOLT_PODMAN_RUNTIME", "runc"),
    "cgroup_manager": os.environ.get("MOLT_PODMAN_CGROUP_MANAGER", "cgroupfs"),
    "ulimits": _ulimits(),
}


def podman_global_args() -> tuple[str, ...]:
    args: list[str] = []
    if ENGINE_OPTIONS["runtime"]:
        args += ["--runtime", str(ENGINE_OPTIONS["runtime"])]
    if ENGINE_OPTIONS["cgroup_manager"]:
        args += ["--cgroup-manager", str(ENGINE_OPTIONS["cgroup_manager"])]
    return tuple(args)


def podman_ulimit_args() -> tuple[str, ...]:
    args: list[str] = []
    for name, value in _ulimits().items():
        args += ["--ulimit", f"{name}={value}:{value}"]
    return tuple(args)


def agent_engine_args() -> list[str]:
    """`clawnode run`'s options for the same engine settings (the agent tests' daemons)."""
    args: list[str] = []
    if ENGINE_OPTIONS["runtime"]:
        args += ["--container-runtime", str(ENGINE_OPTIONS["runtime"])]
    if ENGINE_OPTIONS["cgroup_manager"]:
        args += ["--cgroup-manager", str(ENGINE_OPTIONS["cgroup_manager"])]
    for name, value in _ulimits().items():
        args += ["--container-ulimit", f"{name}={value}"]
    return args


def container_spec(name: str, ref: str, image: str, netns: str, **extra) -> ContainerSpec:
    """A container as the tier's engine tests start it: small limits, no GPUs, asleep; `extra`
    overrides any field."""
    values = {
        "name": name,
        "ref": ref,
        "image": image,
        "netns": netns,
        "cdi_devices": (),
        "cpus_milli": 500,
        "memory_mb": 64,
        "pids_limit": 64,
        "disk_gb": 1,
        "command": ("sleep", "infinity"),
    }
    values.update(extra)
    return ContainerSpec(**values)


@pytest.fixture(scope="session")
def test_image() -> str:
    return image.ensure_image(podman_global_args())


@pytest.fixture
def engine(tmp_path: Path) -> PodmanEngine:
    # conmon leaves an "oom" file in podman's working directory: the test's, not the checkout.
    return PodmanEngine(**ENGINE_OPTIONS, workdir=tmp_path)  # type: ignore[arg-type]


@pytest.fixture
def cdi(tmp_path: Path) -> CdiGpus:
    # Podman 4.3 reads specs from /etc/cdi and /var/run/cdi only; the stand-in device nodes go
    # where the agent makes them, in /dev (runc binds them from there into a user namespace).
    return CdiGpus(spec_dir=Path("/etc/cdi"))


_numbers = itertools.count(1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class VethNetwork:
    """A SandboxNetwork for the tier: a namespace per ref with a veth to the host; the host side
    routes the sandbox address into it. Refs map to namespaces "molt-t<pid>-<n>"."""

    def __init__(self) -> None:
        self.refs: dict[str, str] = {}
        self.host_addresses: dict[str, str] = {}

    def setup(self, ref: str, address: str, peer_address: str, egress: bool) -> str:
        if ref in self.refs:
            return f"/var/run/netns/{self.refs[ref]}"
        n = next(_numbers)
        name = f"molt-t{os.getpid()}-{n}"
        host_if, inner_if = f"mth{os.getpid() % 10000}{n}", f"mti{os.getpid() % 10000}{n}"
        sandbox = address.split("/")[0]
        # The host end's own address: the sandbox's with the last octet 1 (tests use x.y.z.2+).
        host = sandbox.rsplit(".", 1)[0] + ".1"
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", inner_if)
        _ip("link", "set", inner_if, "netns", name)
        _ip("-n", name, "link", "set", inner_if, "name", "eth0")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "addr", "add", f"{sandbox}/32", "dev", "eth0")
        _ip("-n", name, "route", "add", f"{host}/32", "dev", "eth0")
        _ip("-n", name, "route", "add", "default", "via", host, "dev", "eth0")
        _ip("addr", "add", f"{host}/32", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("route", "add", f"{sandbox}/32", "dev", host_if, "src", host)
        self.refs[ref] = name
        self.host_addresses[ref] = host
        return f"/var/run/netns/{name}"

    def teardown(self, ref: str) -> None:
        name = self.refs.pop(ref, None)
        if name is not None:
            # Deleting the namespace deletes its veth end, and the peer on the host with it.
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)

    def present(self) -> set[str]:
        return set(self.refs)


@pytest.fixture
def network():
    net = VethNetwork()
    yield net
    for ref in list(net.refs):
        net.teardown(ref)


@pytest.fixture
def cleanup_containers(engine):
    """Names to remove at the end whatever the test did."""
    names: list[str] = []
    yield names
    for name in names:
        engine.remove(name)
