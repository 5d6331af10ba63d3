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

from tests.sandbox.conftest import container_spec

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
    cleanup_containers.append("molt-order-7002")
    netns = network.setup("order:7002", "10.254.22.2/32", "10.255.0.9/32", False)
    engine.start(container_spec("molt-order-7002", "order:7002", test_image, netns))

    manager = SandboxManager(
        engine, network, Inventory(), tmp_path / "state", ssh_banner_probe, cdi=cdi
    )
    manager.apply(())

    assert "molt-order-7002" not in names_in_podman()
    assert network.present() == set()


def test_the_buyers_root_is_an_unprivileged_host_uid_without_the_hosts_powers(
    engine, test_image, network, cdi, tmp_path, cleanup_containers
):
    cleanup_containers.append("molt-order-7001")
    buyer_key = keypair(tmp_path / "buyer")
    manager = SandboxManager(
        engine, network, Inventory(), tmp_path / "state", ssh_banner_probe, cdi=cdi
    )
    manager.apply((spec(test_image, buyer_key),))
    manager.wait_idle()
    [report] = manager.reports(changed_only=True)
    assert report.state == "ready", report.detail
    known = known_hosts_from(report, "10.254.21.2", tmp_path / "known_hosts")

    def buyer(command: str) -> subprocess.CompletedProcess[str]:
        return ssh(tmp_path / "buyer", known, "10.254.21.2", command)

    mapped = buyer("id -u; cat /proc/self/uid_map /proc/self/gid_map")
    assert mapped.returncode == 0, mapped.stderr
    uid, uid_map, gid_map = mapped.stdout.splitlines()
    assert uid == "0"
    inside, outside, count = (int(part) for part in uid_map.split())
    # Root inside is one uid of a range of its own on the host, never the host's root.
    assert inside == 0 and outside > 0 and count == 65536, uid_map
    assert int(gid_map.split()[1]) > 0, gid_map
    # The host sees the sandbox's processes, and what the buyer writes, as that uid.
    pid = subprocess.run(
        [
            "podman",
            "inspect",
            "--format",
            "{{.State.Pid}} {{.GraphDriver.Data.UpperDir}}",
            "molt-order-7001",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    status = Path(f"/proc/{pid[0]}/status").read_text()
    [uids] = [line for line in status.splitlines() if line.startswith("Uid:")]
    assert set(uids.split()[1:]) == {str(outside)}
    assert buyer("touch /root/made-by-the-buyer").returncode == 0
    assert (Path(pid[1]) / "root" / "made-by-the-buyer").stat().st_uid == outside

    # The GPU's device node is the host's own (bound in): the host's root owns it and could
    # chmod it; the buyer's root cannot, nor mount, nor undo the read-only mount of its sshd
    # files.
    node = Path("/dev/nvidia0")
    mode = node.stat().st_mode
    denied = buyer(
        "chmod 000 /dev/nvidia0; echo chmod=$?; mount -t tmpfs none /mnt; echo mount=$?; "
        "mount -o remount,rw /etc/molt; echo remount=$?; "
        "echo x >> /etc/molt/authorized_keys; echo write=$?"
    )
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout.split() == ["chmod=1", "mount=32", "remount=32", "write=1"], (
        denied.stdout,
        denied.stderr,
    )
    assert node.stat().st_mode == mode
    # What the buyer still needs: its GPUs, and a shell with a terminal (sshd chowns the pty).
    listing = buyer("ls /dev/nvidia*; test -r /dev/nvidia0 && test -w /dev/nvidia0 && echo rw")
    assert listing.stdout.split() == ["/dev/nvidia0", "/dev/nvidia2", "rw"], listing.stderr
    terminal = subprocess.run(
        [
            *("ssh", "-tt", "-F", "/dev/null", "-i", str(tmp_path / "buyer")),
            *("-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"),
            *("-o", f"UserKnownHostsFile={known}", "root@10.254.21.2", "tty"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert terminal.returncode == 0 and terminal.stdout.startswith("/dev/pts/"), terminal

    manager.apply(())
