"""The sandbox tier's test image: Debian minbase with OpenSSH server, built with mmdebstrap.

No container registry is reachable from the development machines, so the tier builds its image
from Debian packages (about 100 s), caches the tarball under /var/cache/molt-sandbox (like the
vm tier's kernel, tests/vm/harness.py) and ``podman import``s it. The import declares an exposed
port (8888, as a Jupyter image would) so the manager's port report has something to read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from tests.vm.harness import locked, static_binary

PACKAGES = ("openssh-server", "iproute2", "python3")
EXPOSED_PORT = 8888
# The tarball's name carries what went into it, so a changed package list builds a new one.
_RECIPE = "minbase:" + ",".join(PACKAGES) + f":expose={EXPOSED_PORT}"
TAG = "localhost/molt-sandbox-test:" + hashlib.sha256(_RECIPE.encode()).hexdigest()[:12]
TOOLS = (
    ("podman", "podman"),
    ("runc", "runc"),
    ("mmdebstrap", "mmdebstrap"),
    ("ssh", "openssh-client"),
    # The disk-per-job tests make XFS file systems of their own (tests/sandbox/test_disk_quota.py).
    ("mkfs.xfs", "xfsprogs"),
    ("losetup", "mount"),
)


def missing_tools() -> str | None:
    """Why the sandbox tier cannot run here, or None (the image is built on first use)."""
    if os.geteuid() != 0:
        return "needs root (rootful podman, network namespaces, mknod)"
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install {package})"
    if shutil.which("ip") is None:
        return "needs ip (apt-get install iproute2)"
    # The disk-quota tests' image is the host's busybox, which must run without a libc.
    found = shutil.which("busybox")
    if found is None or not static_binary(Path(found)):
        return "needs a static busybox (apt-get install busybox-static)"
    return None


def cache_dir() -> Path:
    configured = os.environ.get("MOLT_SANDBOX_CACHE")
    return Path(configured) if configured else Path("/var/cache/molt-sandbox")


def tarball() -> Path:
    """The image's root filesystem as a tarball, built once and cached."""
    cache = cache_dir()
    target = cache / (TAG.rsplit(":", 1)[1] + ".tar")
    with locked(cache / ".lock"):
        if target.exists():
            return target
        # A build cut short leaves only this file behind (mmdebstrap --format=tar unpacks in a
        # temporary directory of its own and cleans up its mounts there).
        partial = cache / f".{target.name}.partial"
        partial.unlink(missing_ok=True)
        subprocess.run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=" + ",".join(PACKAGES),
                "--quiet",
                "--format=tar",
                "bookworm",
                str(partial),
            ],
            check=True,
            timeout=900,
            capture_output=True,
        )
        partial.rename(target)
        return target


def ensure_image(podman_args: tuple[str, ...] = ()) -> str:
    """The test image's tag, imported into podman's store if not there yet."""
    probe = subprocess.run(
        ["podman", *podman_args, "image", "exists", TAG], capture_output=True, timeout=60
    )
    if probe.returncode == 0:
        return TAG
    source = tarball()
    subprocess.run(
        [
            "podman",
            *podman_args,
            "import",
            "--change",
            f"EXPOSE {EXPOSED_PORT}/tcp",
            str(source),
            TAG,
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return TAG
