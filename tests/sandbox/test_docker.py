"""The Docker engine (clawnode.sandbox.docker) against a Docker Engine REST API: Podman's own
compat service (`podman system service`) on a temporary unix socket, with the tier's podman
settings (runc, cgroupfs); no Docker daemon runs on the development machines. What this proves
is the REST path as Podman answers it; the CDI request body is checked in the unit tier
(tests/unit/test_docker_engine.py), since Podman 4.3's compat API drops DeviceRequests (the
engine refuses then: the last test here)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from clawnode.sandbox.docker import DockerEngine
from clawnode.sandbox.engine import LABEL_MANAGED, LABEL_REF, EngineError

from tests.sandbox.conftest import ENGINE_OPTIONS, container_spec, podman_global_args
from tests.sandbox.test_podman import GPUS, exec_in, podman_ps_all

pytestmark = [pytest.mark.sandbox]


@pytest.fixture
def docker_engine(tmp_path: Path):
    sock = tmp_path / "docker.sock"
    service = subprocess.Popen(
        ["podman", *podman_global_args(), "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        for _ in range(300):
            if sock.exists():
                break
            assert service.poll() is None, service.stderr.read() if service.stderr else ""
            time.sleep(0.1)
        assert sock.exists(), "podman system service made no socket"
        yield DockerEngine(host=f"unix://{sock}", ulimits=ENGINE_OPTIONS["ulimits"])
    finally:
        service.terminate()
        service.wait(timeout=30)


def wait_stopped(engine: DockerEngine, name: str) -> None:
    """Until the engine lists `name` as not running (or not at all); at most about 10 s."""
    for _ in range(200):
        if not [c for c in engine.containers() if c.name == name and c.running]:
            return
        time.sleep(0.05)


def podman_inspect(name: str) -> dict:
    out = subprocess.run(
        ["podman", "inspect", name], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return json.loads(out)[0]


def test_docker_engine_runs_a_limited_reachable_sandbox_and_removes_it(
    docker_engine, test_image, network
):
    netns = network.setup("order:docker", "10.254.21.2/32", "10.255.0.9/32", False)
    name = "molt-test-docker"
    try:
        started = docker_engine.start(
            container_spec(
                name,
                "order:docker",
                test_image,
                netns,
                cpus_milli=1500,
                memory_mb=192,
                pids_limit=99,
                env={"MOLT_GREETING": "hello"},
                labels={"molt.extra": "x"},
                command=("python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"),  # noqa: S104
                # (the sandbox address arrives after the server starts: start() moves it in)
            )
        )
        assert (started.name, started.ref, started.running) == (name, "order:docker", True)

        # The limits, as the engine applied them (podman's own view of the container).
        host_config = podman_inspect(name)["HostConfig"]
        assert host_config["NanoCpus"] == 1_500_000_000
        assert host_config["Memory"] == 192 * 1024 * 1024
        assert host_config["PidsLimit"] == 99
        labels = podman_inspect(name)["Config"]["Labels"]
        assert labels[LABEL_MANAGED] == "1" and labels[LABEL_REF] == "order:docker"
        assert exec_in(name, "sh", "-c", "echo $MOLT_GREETING").strip() == "hello"
        nofile = ENGINE_OPTIONS["ulimits"].get("nofile")
        if nofile:
            assert exec_in(name, "sh", "-c", "ulimit -n").strip() == str(nofile)

        # The network: the sandbox address is inside the container, and the host reaches the
        # container's server at it through the veth.
        assert "10.254.21.2/32" in exec_in(name, "ip", "-4", "addr", "show", "eth0")
        body = b""
        for _ in range(100):
            try:
                with socket.create_connection(("10.254.21.2", 8000), timeout=2) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    body = conn.recv(100)
                break
            except OSError:
                time.sleep(0.1)
        assert body.startswith(b"HTTP/1.0 200"), body
        # ... and the named namespace now stands for the container's (what teardown removes).
        inside = subprocess.run(
            ["ip", "-n", os.path.basename(netns), "-4", "addr", "show", "eth0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "10.254.21.2/32" in inside

        # Listed by label (what reconcile finds after an agent restart).
        found = [(c.name, c.ref, c.running) for c in docker_engine.containers()]
        assert (name, "order:docker", True) in found
        assert docker_engine.exposed_ports(test_image) == (8888,)
    finally:
        docker_engine.remove(name)
    docker_engine.remove(name)  # already gone: fine
    assert name not in podman_ps_all()
    assert name not in [c.name for c in docker_engine.containers()]


def test_docker_engine_failed_start_leaves_nothing_and_says_why(docker_engine, network):
    netns = network.setup("order:dockerbad", "10.254.22.2/32", "10.255.0.9/32", False)
    name = "molt-test-docker-bad"
    with pytest.raises(EngineError) as failure:
        docker_engine.start(
            container_spec(name, "order:dockerbad", "localhost/molt-no-such-image:1", netns)
        )
    assert "failed" in str(failure.value)
    assert name not in podman_ps_all()
    assert docker_engine.has_image("localhost/molt-no-such-image:1") is False


def test_docker_engine_says_why_a_container_stopped(docker_engine, test_image, network):
    netns = network.setup("order:dockerexit", "10.254.25.2/32", "10.255.0.9/32", False)
    name = "molt-test-docker-exit"
    try:
        docker_engine.start(
            container_spec(
                name,
                "order:dockerexit",
                test_image,
                netns,
                command=(
                    "sh",
                    "-c",
                    "trap 'echo first; echo it broke; exit 3' TERM; while :; do sleep 0.05; done",
                ),
            )
        )
        subprocess.run(
            ["podman", "kill", "--signal", "TERM", name], check=True, capture_output=True
        )
        wait_stopped(docker_engine, name)
        assert docker_engine.exit_detail(name) == "the container stopped (exit code 3): it broke"
    finally:
        docker_engine.remove(name)
    assert docker_engine.exit_detail(name) == "the container is gone"


def test_docker_engine_a_command_that_exits_at_once_says_why_and_leaves_nothing(
    docker_engine, test_image, network
):
    netns = network.setup("order:dockerquick", "10.254.26.2/32", "10.255.0.9/32", False)
    name = "molt-test-docker-quick"
    quick = container_spec(
        name, "order:dockerquick", test_image, netns, command=("sh", "-c", "echo it broke; exit 3")
    )
    try:
        docker_engine.start(quick)
    except EngineError as failure:
        # Stopped before or during the network join: the start fails with the reason.
        assert str(failure) == "the container stopped (exit code 3): it broke"
        assert name not in podman_ps_all()
    else:
        # (Only if the join won the race: the container then stops on its own.)
        wait_stopped(docker_engine, name)
        assert docker_engine.exit_detail(name) == "the container stopped (exit code 3): it broke"
        docker_engine.remove(name)


def test_docker_engine_images_and_a_failed_pull(docker_engine, test_image):
    assert docker_engine.has_image(test_image) is True
    # No registry is reachable here; what matters is the buyer-readable failure.
    image = "localhost/molt-no-such-image:1"
    seen: list[int] = []
    with pytest.raises(EngineError) as failure:
        docker_engine.pull(image, seen.append)
    assert str(failure.value).startswith(f"pulling {image} failed: ")
    assert seen == [0]


def test_docker_engine_refuses_gpus_the_engine_drops(docker_engine, test_image, network, cdi):
    # Podman 4.3's compat API accepts a CDI DeviceRequest and silently drops it (the container
    # would start without its GPUs): the engine sees that in inspect and fails closed.
    cdi.prepare(GPUS)
    netns = network.setup("order:dockergpu", "10.254.23.2/32", "10.255.0.9/32", False)
    name = "molt-test-docker-gpu"
    with pytest.raises(EngineError) as failure:
        docker_engine.start(
            container_spec(
                name, "order:dockergpu", test_image, netns, cdi_devices=cdi.devices([3, 1])
            )
        )
    assert "did not take the GPU request" in str(failure.value)
    assert name not in podman_ps_all()


def test_docker_engine_under_the_manager_buyer_ssh_restart_adoption_removal(
    docker_engine, test_image, network, cdi, tmp_path
):
    # The podman engine's end-to-end path (tests/sandbox/test_manager.py) on the Docker engine,
    # without GPUs (the compat API drops them, above): sshd as the sandbox's command, the
    # buyer's ssh through the veth moved into the container, a new manager adopting it.
    import dataclasses

    from clawnode.sandbox.manager import SandboxManager, ssh_banner_probe

    from tests.sandbox.test_manager import Inventory, keypair, known_hosts_from, spec, ssh

    buyer_key = keypair(tmp_path / "buyer")
    wanted = dataclasses.replace(
        spec(test_image, buyer_key), ref="order:7003", address="10.254.24.2/32", gpus=()
    )
    name = "molt-order-7003"
    try:
        first = SandboxManager(
            docker_engine, network, Inventory(), tmp_path / "state", ssh_banner_probe, cdi=cdi
        )
        first.apply((wanted,))
        first.wait_idle()
        [report] = first.reports(changed_only=True)
        assert (report.state, report.detail) == ("ready", "")
        known = known_hosts_from(report, "10.254.24.2", tmp_path / "known_hosts")
        session = ssh(tmp_path / "buyer", known, "10.254.24.2", "ip -4 -o addr show eth0")
        assert session.returncode == 0, session.stderr
        assert "10.254.24.2/32" in session.stdout
        before = podman_inspect(name)["Id"]

        del first  # the agent stops; the container is not its child
        second = SandboxManager(
            docker_engine, network, Inventory(), tmp_path / "state", ssh_banner_probe, cdi=cdi
        )
        second.apply((wanted,))
        second.wait_idle()
        [adopted] = second.reports(changed_only=False)
        assert (adopted.state, adopted.host_keys) == ("ready", report.host_keys)
        assert podman_inspect(name)["Id"] == before
        assert ssh(tmp_path / "buyer", known, "10.254.24.2", "true").returncode == 0

        second.apply(())
        assert name not in podman_ps_all()
        assert "order:7003" not in network.present()
    finally:
        docker_engine.remove(name)


@pytest.fixture
def agent_network():
    """The agent's own SandboxNetwork (clawnode.sandbox.network), whose named namespace the
    Docker engine replaces by the container's: its teardown must still remove it."""
    from clawnode.sandbox.network import NetnsSandboxNetwork

    net = NetnsSandboxNetwork()
    yield net
    if "order:7003" in net.present():
        net.teardown("order:7003")


def test_docker_engine_under_the_manager_with_the_agents_own_network(
    docker_engine, test_image, agent_network, cdi, tmp_path
):
    test_docker_engine_under_the_manager_buyer_ssh_restart_adoption_removal(
        docker_engine, test_image, agent_network, cdi, tmp_path
    )
    assert not os.path.exists("/var/run/netns/molt-order-7003")
