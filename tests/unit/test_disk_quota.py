"""Whether a container store enforces disk_gb (clawnode.sandbox.quota), read from what podman
and Docker report and from /proc/mounts, and what PodmanEngine passes for it. The real store,
XFS with project quotas on a loop device, is in tests/sandbox/test_disk_quota.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from clawnode.sandbox import quota
from clawnode.sandbox.engine import ContainerSpec, EngineError
from clawnode.sandbox.podman import PodmanEngine
from clawnode.sandbox.quota import docker_store_quota, mount_of, podman_store_quota

pytestmark = [pytest.mark.unit]

MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/loop3 /srv/containers xfs rw,relatime,attr2,inode64,logbufs=8,logbsize=32k,prjquota 0 0
/dev/loop4 /srv/plain xfs rw,relatime,attr2,inode64,logbufs=8,logbsize=32k,noquota 0 0
/dev/loop5 /srv/with\\040space xfs rw,relatime,prjquota 0 0
"""


def podman_info(root: str, driver: str = "overlay", backing: str = "xfs") -> dict:
    """The part of `podman info --format json` (4.3) the check reads."""
    return {
        "store": {
            "graphDriverName": driver,
            "graphRoot": root,
            "graphStatus": {"Backing Filesystem": backing, "Supports d_type": "true"},
        }
    }


def test_overlay_on_xfs_with_project_quotas_is_enforced() -> None:
    found = podman_store_quota(podman_info("/srv/containers/storage"), MOUNTS)
    assert found.enforced
    assert "/srv/containers" in found.reason


def test_the_default_ext4_store_is_not_and_says_its_filesystem() -> None:
    found = podman_store_quota(podman_info("/var/lib/containers/storage", backing="extfs"), MOUNTS)
    assert not found.enforced
    assert "extfs" in found.reason and "/var/lib/containers/storage" in found.reason


def test_xfs_without_prjquota_is_not_and_says_its_mount_options() -> None:
    found = podman_store_quota(podman_info("/srv/plain/storage"), MOUNTS)
    assert not found.enforced
    assert "without prjquota" in found.reason and "noquota" in found.reason


def test_another_storage_driver_is_not() -> None:
    found = podman_store_quota(podman_info("/srv/containers/storage", driver="vfs"), MOUNTS)
    assert not found.enforced and "vfs" in found.reason


def test_an_unanswered_info_is_not() -> None:
    assert not podman_store_quota({}, MOUNTS).enforced


def test_the_longest_mount_point_holds_the_path_and_escapes_are_read() -> None:
    assert mount_of("/srv/containers/storage/overlay", MOUNTS)[:2] == ("/srv/containers", "xfs")
    assert mount_of("/srv/containersX", MOUNTS)[:2] == ("/", "ext4")
    assert mount_of("/srv/with space/s", MOUNTS)[:2] == ("/srv/with space", "xfs")
    # A later mount over the same point hides the earlier one.
    over = MOUNTS + "tmpfs /srv/containers tmpfs rw 0 0\n"
    assert mount_of("/srv/containers/storage", over)[1] == "tmpfs"


def test_docker_overlay2_takes_the_same_rule() -> None:
    def info(root: str, backing: str) -> dict:
        return {
            "Driver": "overlay2",
            "DockerRootDir": root,
            "DriverStatus": [["Backing Filesystem", backing], ["Supports d_type", "true"]],
        }

    assert docker_store_quota(info("/srv/containers/docker", "xfs"), MOUNTS).enforced
    plain = docker_store_quota(info("/srv/plain/docker", "xfs"), MOUNTS)
    assert not plain.enforced and "noquota" in plain.reason
    assert not docker_store_quota(info("/var/lib/docker", "extfs"), MOUNTS).enforced
    assert not docker_store_quota({"Driver": "overlay", "DockerRootDir": "/x"}, MOUNTS).enforced


# -- PodmanEngine -----------------------------------------------------------------------------

SPEC = ContainerSpec(
    name="molt-order-7",
    ref="order:7",
    image="debian:12",
    netns="/var/run/netns/molt-order-7",
    cdi_devices=(),
    cpus_milli=1000,
    memory_mb=256,
    pids_limit=64,
    disk_gb=3,
)


def fake_podman(tmp_path: Path, info: dict) -> Path:
    """A podman that records each argv (JSON) in calls.jsonl and answers `info` with `info`;
    `inspect` says PID 0, so every start fails after its `run`."""
    script = tmp_path / "podman"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'info' in sys.argv:\n"
        f"    print({json.dumps(info)!r})\n"
        "if 'inspect' in sys.argv:\n"
        "    print('0')\n"
    )
    script.chmod(0o755)
    return script


def runs(tmp_path: Path) -> list[list[str]]:
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    return [argv for argv in map(json.loads, lines) if "run" in argv or "info" in argv]


def start_twice(engine: PodmanEngine) -> None:
    for _ in range(2):
        with pytest.raises(EngineError):  # the stand-in's container never runs
            engine.start(SPEC)


def test_a_quota_store_gets_the_jobs_disk_as_storage_opt_asked_once(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    monkeypatch.setattr(quota, "MOUNTS", mounts)
    podman = fake_podman(tmp_path, podman_info("/srv/containers/storage"))
    engine = PodmanEngine(
        podman=str(podman), workdir=tmp_path, root="/srv/containers/storage", runroot="/run/s"
    )

    with caplog.at_level(logging.INFO, logger="clawnode.sandbox"):
        start_twice(engine)

    info, first, second = runs(tmp_path)
    # The store is podman's global --root/--runroot, on every call, info's too.
    assert info[:4] == ["--root", "/srv/containers/storage", "--runroot", "/run/s"]
    assert "info" in info
    for run in (first, second):
        assert run[run.index("--storage-opt") + 1] == "size=3G"
    assert [r.levelname for r in caplog.records if "disk per job" in r.message] == ["INFO"]
    assert engine.disk_quota().enforced


def test_any_other_store_gets_no_storage_opt_and_one_warning_saying_why(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    monkeypatch.setattr(quota, "MOUNTS", mounts)
    podman = fake_podman(tmp_path, podman_info("/srv/plain/storage"))
    engine = PodmanEngine(podman=str(podman), workdir=tmp_path)

    with caplog.at_level(logging.INFO, logger="clawnode.sandbox"):
        start_twice(engine)

    info, first, second = runs(tmp_path)
    assert "--root" not in info  # storage.conf's store
    assert "--storage-opt" not in first and "--storage-opt" not in second
    [warning] = [r for r in caplog.records if "disk per job" in r.message]
    assert warning.levelname == "WARNING"
    assert "NOT enforced" in warning.message and "noquota" in warning.message
