"""The Podman engine against real rootful podman: GPUs, limits, lifetime, removal.

Each container joins a namespace + veth the test makes; the simulated GPUs reach it through a
real CDI spec of stand-in device nodes, the path real GPUs take.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from clawnode.gpu import SimulatedGpuReader
from clawnode.sandbox.engine import LABEL_MANAGED, LABEL_REF, ContainerSpec, EngineError
from clawnode.sandbox.podman import PodmanEngine

from tests.sandbox.conftest import (
    ENGINE_OPTIONS,
    container_spec,
    podman_global_args,
    podman_ulimit_args,
)

pytestmark = [pytest.mark.sandbox]

GPUS = SimulatedGpuReader("RTX 4090:4", seed="sandbox-tier").read().gpus


def spec(name, image, netns, **extra) -> ContainerSpec:
    larger = {"cpus_milli": 1000, "memory_mb": 256, "pids_limit": 256}
    return container_spec(name, f"order:{name}", image, netns, **{**larger, **extra})


def exec_in(name: str, *command: str) -> str:
    done = subprocess.run(
        ["podman", *podman_global_args(), "exec", name, *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def podman_ps_all() -> list[str]:
    out = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return out.split()


def test_container_gets_exactly_its_two_of_four_gpus(
    engine, test_image, network, cdi, cleanup_containers
):
    cdi.prepare(GPUS)
    mine = (GPUS[1], GPUS[3])
    netns = network.setup("order:gpus", "10.254.11.2/32", "10.255.0.9/32", False)
    name = "molt-test-gpus"
    cleanup_containers.append(name)

    started = engine.start(
        spec(
            name,
            test_image,
            netns,
            cdi_devices=cdi.devices([3, 1]),
            env=cdi.env(mine),
        )
    )

    assert started.running and started.ref == "order:molt-test-gpus"
    assert started.labels[LABEL_MANAGED] == "1" and started.labels[LABEL_REF] == started.ref
    listing = exec_in(name, "sh", "-c", "for d in /dev/nvidia*; do stat -c '%n %F %t:%T' $d; done")
    assert listing.splitlines() == [
        "/dev/nvidia1 character special file c3:1",
        "/dev/nvidia3 character special file c3:3",
    ]
    # Nor can the job make itself a node of another GPU (no CAP_MKNOD in the container).
    made = exec_in(name, "sh", "-c", "mknod /tmp/nvidia0 c 195 0 2>/dev/null; echo rc=$?")
    assert made.strip() != "rc=0"
    visible = exec_in(name, "sh", "-c", 'echo "$NVIDIA_VISIBLE_DEVICES"').strip()
    assert visible == f"{GPUS[1].uuid},{GPUS[3].uuid}"
    # The container sees the namespace the test made, with the sandbox's address.
    assert "10.254.11.2/32" in exec_in(name, "ip", "-o", "addr", "show", "dev", "eth0")


def test_allocation_past_the_memory_limit_is_killed_inside_and_the_host_is_unharmed(
    engine, test_image, network, cleanup_containers, tmp_path, monkeypatch
):
    # conmon marks an OOM kill with an empty "oom" file in podman's working directory: it
    # must land in the engine's workdir, not wherever the agent was started from.
    elsewhere = tmp_path / "started-from"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    netns = network.setup("order:oom", "10.254.12.2/32", "10.255.0.9/32", False)
    name = "molt-test-oom"
    cleanup_containers.append(name)
    hog = "python3 -c \"b = b'x' * (400 * 1024 * 1024)\"; echo hog-exit=$?; sleep infinity"
    engine.start(spec(name, test_image, netns, memory_mb=128, command=("sh", "-c", hog)))

    deadline = time.monotonic() + 60
    logs = ""
    while "hog-exit=" not in logs and time.monotonic() < deadline:
        time.sleep(0.2)
        logs = subprocess.run(
            ["podman", "logs", name], capture_output=True, text=True, timeout=30
        ).stdout

    # SIGKILL from the OOM killer (128 + 9); the shell (PID 1) lives on, so the kill stayed
    # inside the container's cgroup.
    assert "hog-exit=137" in logs
    assert [c.running for c in engine.containers() if c.name == name] == [True]
    assert (tmp_path / "oom").exists() and not (elsewhere / "oom").exists()
    limit = json.loads(
        subprocess.run(
            ["podman", "inspect", "--format", "{{json .HostConfig.Memory}}", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )
    assert limit == 128 * 1024 * 1024


def test_container_outlives_the_process_that_started_it(
    engine, test_image, network, cleanup_containers
):
    netns = network.setup("order:outlive", "10.254.13.2/32", "10.255.0.9/32", False)
    name = "molt-test-outlive"
    cleanup_containers.append(name)
    script = textwrap.dedent(
        f"""
        from clawnode.sandbox.engine import ContainerSpec
        from clawnode.sandbox.podman import PodmanEngine
        engine = PodmanEngine(**{ENGINE_OPTIONS!r})
        engine.start(ContainerSpec(name={name!r}, ref="order:outlive", image={test_image!r},
            netns={netns!r}, cdi_devices=(), cpus_milli=500, memory_mb=64, pids_limit=64,
            disk_gb=1, command=("sleep", "infinity")))
        """
    )
    starter = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert starter.returncode == 0, starter.stderr

    # The starter has exited (run() waited for it); its container runs on.
    found = [c for c in engine.containers() if c.name == name]
    assert [(c.ref, c.running) for c in found] == [("order:outlive", True)]


def test_remove_leaves_nothing_and_is_idempotent(engine, test_image, network):
    netns = network.setup("order:rm", "10.254.14.2/32", "10.255.0.9/32", False)
    name = "molt-test-remove"
    engine.start(spec(name, test_image, netns))
    exec_in(name, "sh", "-c", "echo written > /root/scratch")
    assert name in podman_ps_all()

    engine.remove(name)
    engine.remove(name)  # already gone: fine

    assert name not in podman_ps_all()
    assert name not in [c.name for c in engine.containers()]


def test_failed_start_leaves_nothing_and_says_why(engine, test_image, network):
    netns = network.setup("order:bad", "10.254.15.2/32", "10.255.0.9/32", False)
    name = "molt-test-bad-device"
    with pytest.raises(EngineError) as failure:
        engine.start(spec(name, test_image, netns, cdi_devices=("nvidia.com/gpu=77",)))
    message = str(failure.value)
    assert message.startswith("podman run failed: ")
    assert "nvidia.com/gpu=77" in message
    assert name not in podman_ps_all()


def test_missing_image_pull_fails_with_a_reason(engine):
    # No registry is reachable here; what matters is the buyer-readable failure.
    image = "localhost/molt-no-such-image:1"
    assert engine.has_image(image) is False
    seen: list[int] = []
    with pytest.raises(EngineError) as failure:
        engine.pull(image, seen.append)
    assert str(failure.value).startswith(f"pulling {image} failed: ")
    assert seen == [0]


def test_exposed_ports_come_from_the_image(engine, test_image):
    from tests.sandbox.image import EXPOSED_PORT

    assert engine.exposed_ports(test_image) == (EXPOSED_PORT,)


def test_an_engine_with_a_wrong_binary_says_so():
    engine = PodmanEngine(podman="/nonexistent/podman")
    with pytest.raises(EngineError, match="podman is not installed"):
        engine.containers()


def test_the_jobs_sshd_config_passes_the_images_own_sshd(engine, test_image, tmp_path):
    from clawnode.sandbox import sshd

    material = sshd.write_material(
        tmp_path / "job", "molt-test-config", ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA x",), {}
    )
    [(host_dir, inside)] = material.mounts.items()
    checked = subprocess.run(
        [
            "podman",
            *podman_global_args(),
            "run",
            "--rm",
            *podman_ulimit_args(),
            "--network",
            "none",
            "--mount",
            f"type=bind,source={host_dir},destination={inside},ro=true",
            test_image,
            "sh",
            "-c",
            material.command[-1].replace("exec /usr/sbin/sshd -D -e", "exec /usr/sbin/sshd -T")
            + " | grep -E '^(permitrootlogin|passwordauthentication|usepam|authorizedkeysfile) '",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    assert sorted(checked.stdout.splitlines()) == [
        "authorizedkeysfile /etc/molt/authorized_keys",
        "passwordauthentication no",
        "permitrootlogin without-password",
        "usepam no",
    ]


def test_pull_reports_progress_from_podmans_own_lines(engine, test_image, tmp_path):
    # No registry here: an OCI archive is pulled through the same `podman pull` and prints the
    # same lines a registry pull does without a terminal.
    archive = tmp_path / "image.tar"
    subprocess.run(
        ["podman", "save", "--format", "oci-archive", "-o", str(archive), test_image],
        check=True,
        capture_output=True,
        timeout=300,
    )
    seen: list[int] = []

    engine.pull(f"oci-archive:{archive}", seen.append)

    assert seen[0] == 0 and seen[-1] == 100
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert 90 in seen and 95 in seen  # the config and the manifest
    assert any(0 < value < 80 for value in seen)  # at least one layer
