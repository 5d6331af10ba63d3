"""Disk per job where the kernel enforces it: Debian's kernel (tests/vm/harness.py) runs the
sandbox tier's enforcing test, tests/sandbox/test_disk_quota.py, in the guest.

The development machines' kernels have no quota support (XFS mounts there say "quota support
not available in this kernel"), so that test is collected only in the guest (MOLT_VM_GUEST);
Debian's kernel has quotas. Inside the
guest it makes its XFS file system with prjquota on a loop device, a podman store on it, and a
sandbox with disk_gb=1 that writes 0.5 GB but not 1.2 GB. The guest has the host's podman, runc,
xfsprogs and busybox through the shared root; it loads the modules and mounts the cgroup file
system podman needs (the harness's init does neither).
"""

from __future__ import annotations

import shlex
import sys

import pytest

from tests.conftest import CI
from tests.sandbox.image import missing_tools as missing_sandbox_tools
from tests.vm import harness

pytestmark = [pytest.mark.vm]

QUOTA_TEST = (
    "tests/sandbox/test_disk_quota.py::"
    "test_an_xfs_store_with_project_quotas_holds_the_sandbox_to_its_disk_gb"
)
GUEST_PYTEST = [
    sys.executable,
    "-m",
    "pytest",
    "-p",
    "tests.sandbox.conftest",  # the tier's fixtures, without the suite's conftest (no database)
    "--noconftest",
    "-p",
    "no:cacheprovider",
    "-q",
    "-rA",
    "--junitxml=/molt-out/junit.xml",
    "-W",
    "ignore::pytest.PytestConfigWarning",
    QUOTA_TEST,
]
GUEST = [
    "sh",
    "-c",
    "for module in loop xfs overlay veth; do modprobe $module; done; "
    "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec " + shlex.join(GUEST_PYTEST),
]


def test_a_sandbox_is_held_to_its_disk_gb_on_a_kernel_with_xfs_quotas():
    reason = missing_sandbox_tools()
    if reason is not None:
        if CI:
            pytest.fail(f"the disk quota test needs the sandbox tier's tools: {reason}")
        pytest.skip(f"the disk quota test needs the sandbox tier's tools: {reason}")
    try:
        # The XFS file (3 GiB sparse, about 1 GiB written) lives in the guest's memory.
        with harness.boot(GUEST, memory_mb=3072) as run:
            print(
                f"\nvm tier (disk quota): {run.accelerator}, kernel {run.release}, booted in "
                f"{run.boot_s:.1f} s, guest pytest {run.command_s:.1f} s, qemu {run.wall_s:.1f} s"
            )
            assert run.junit().get(QUOTA_TEST) == "passed", run.output
    except harness.VMUnavailable as exc:
        if CI:
            pytest.fail(f"vm tier cannot run: {exc}")
        pytest.skip(f"vm tier skipped: {exc}")
