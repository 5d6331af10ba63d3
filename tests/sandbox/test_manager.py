"""The sandbox manager end to end on real podman: a buyer's ssh reaches sshd in the container
from the host side of its veth, verified against the host key the report carries; an agent
restart adopts the running container without restarting it; orphans are removed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from clawnode import wire
from clawnode.gpu import SimulatedGpuReader
from clawnode.sandbox.manager import SandboxManager, ssh_banner_probe

pytestmark = [pytest.mark.sandbox]

GPUS = SimulatedGpuReader("RTX 4090:4", seed="sandbox-manager").read()


class Inventory:
    def read(self):
        return GPUS


def keypair(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "buyer", "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def ssh(key: Path, known_hosts: Path, address: str, command: str):
    return subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "ConnectTimeout=10",
            f"root@{address}",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def known_hosts_from(report: wire.SandboxReport, address: str, path: Path) -> Path:
    # What the buyer's known_hosts line is made of: the reported key's type and base64.
    lines = [f"{address} {' '.join(key.split()[:2])}" for key in report.host_keys]
    path.write_text("\n".join(lines) + "\n")
    return path


def container_id(name: str) -> str:
    return subprocess.run(
        ["podman", "inspect", "--format", "{{.Id}}", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()


def names_in_podman() -> list[str]:
    return subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()


def spec(image: str, key: str) -> wire.SandboxSpec:
    return wire.SandboxSpec(
        ref="order:7001",
        image=image,
        address="10.254.21.2/32",
        peer_address="10.255.0.9/32",
        gpus=(0, 2),
        cpus=1000,
        memory_mb=256,
        disk_gb=1,
        pids_limit=256,
        egress=False,
        ssh_keys=(key,),
    )


def test_buyer_reaches_sshd_verified_and_a_restart_keeps_the_container(
    engine, test_image, network, cdi, tmp_path, cleanup_containers
):
    cleanup_containers.append("molt-order-7001")
    buyer_key = keypair(tmp_path / "buyer")
    keypair(tmp_path / "stranger")
    first = SandboxManager(
        engine, network, Inventory(), tmp_path / "state", ssh_banner_probe, cdi=cdi
    )

    first.apply((spec(test_image, buyer_key),))
    first.wait_idle()

    [report] = first.reports(changed_only=True)
    assert (report.state, report.detail) == ("ready", "")
    assert report.gpus == (GPUS.gpus[0], GPUS.gpus[2])
    assert report.ports == (8888,)
    known = known_hosts_from(report, "10.254.21.2", tmp_path / "known_hosts")
    session = ssh(
        tmp_path / "buyer",
        known,
        "10.254.21.2",
        'ls /dev/nvidia*; echo "gpus=$NVIDIA_VISIBLE_DEVICES"',
    )
    assert session.returncode == 0, session.stderr
    assert session.stdout.splitlines() == [
        "/dev/nvidia0",
        "/dev/nvidia2",
        f"gpus={GPUS.gpus[0].uuid},{GPUS.gpus[2].uuid}",
    ]
    refused = ssh(tmp_path / "stranger", known, "10.254.21.2", "true")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    # A known_hosts that names another key: the client refuses the server, so the reported key
    # is the one that proved itself above.
    (tmp_path / "other_known_hosts").write_text(
        "10.254.21.2 " + " ".join(buyer_key.split()[:2]) + "\n"
    )
    spoofed = ssh(tmp_path / "buyer", tmp_path / "other_known_hosts", "10.254.21.2", "true")
    assert spoofed.returncode == 255 and "Host key verification failed" in spoofed.stderr

    before = container_id("molt-order-7001")
    del first  # the agent stops; the container is not its child
    second = SandboxManager(
        engine, network, Inventory(), tmp_path / "state", ssh_banner_probe, cdi=cdi
    )
    second.apply((spec(test_image, buyer_key),))
    second.wait_idle()

    [adopted] = second.reports(changed_only=False)
    assert (adopted.state, adopted.host_keys) == ("ready", report.host_keys)
    assert container_id("molt-order-7001") == before
    assert ssh(tmp_path / "buyer", known, "10.254.21.2", "true").returncode == 0

    second.apply(())

    assert "molt-order-7001" not in names_in_podman()
    assert network.present() == set()
    assert [r.state for r in second.reports(changed_only=True)] == ["stopped"]


def test_a_new_manager_removes_orphan_containers_and_namespaces(
    engine, test_image, network, cdi, tmp_path, cleanup_containers
):
    from clawnode.sandbox.engine import ContainerSpec

    cleanup_containers.append("molt-order-7002")
    netns = network.setup("order:7002", "10.254.22.2/32", "10.255.0.9/32", False)
    engine.start(
        ContainerSpec(
            name="molt-order-7002",
            ref="order:7002",
            image=test_image,
            netns=netns,
            cdi_devices=(),
            cpus_milli=500,
            memory_mb=64,
            pids_limit=64,
            disk_gb=1,
            command=("sleep", "infinity"),
        )
    )

    manager = SandboxManager(
        engine, network, Inventory(), tmp_path / "state", ssh_banner_probe, cdi=cdi
    )
    manager.apply(())

    assert "molt-order-7002" not in names_in_podman()
    assert network.present() == set()
