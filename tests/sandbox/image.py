"""The sandbox tier's test images: Debian minbase with OpenSSH server, built with mmdebstrap.

No container registry is reachable from the development machines, so the tier builds its image
from Debian packages (about 100 s), caches the tarball under /var/cache/molt-sandbox (like the
vm tier's kernel, tests/vm/harness.py) and ``podman import``s it. The import declares an exposed
port (8888, as a Jupyter image would) so the manager's port report has something to read.

A Recipe is what goes into one image; BASE is the sandbox tier's, TORCH the mesh tier's (BASE
plus Debian's python3-torch, whose torch.distributed has the gloo backend, for a real collective
across sandboxes on CPUs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.vm.harness import locked, static_binary

PACKAGES = ("openssh-server", "iproute2", "python3")
EXPOSED_PORT = 8888


@dataclass(frozen=True)
class Recipe:
    packages: tuple[str, ...]
    expose: int = EXPOSED_PORT

    @property
    def tag(self) -> str:
        # The tag (and the tarball's name) carries what went into it, so a changed package
        # list builds a new one.
        recipe = "minbase:" + ",".join(self.packages) + f":expose={self.expose}"
        return "localhost/molt-sandbox-test:" + hashlib.sha256(recipe.encode()).hexdigest()[:12]


BASE = Recipe(PACKAGES)
# mmdebstrap installs no Recommends; python3-torch's Depends alone still make this a 1.4 GB image
# (about 165 s to build and 40 s to import here, once), which is why it is the mesh tier's only.
TORCH = Recipe((*PACKAGES, "python3-torch"))
TAG = BASE.tag
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


def tarball(recipe: Recipe = BASE) -> Path:
    """The image's root filesystem as a tarball, built once and cached."""
    cache = cache_dir()
    target = cache / (recipe.tag.rsplit(":", 1)[1] + ".tar")
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
                "--include=" + ",".join(recipe.packages),
                "--quiet",
                "--format=tar",
                "bookworm",
                str(partial),
            ],
            check=True,
            timeout=1800,
            capture_output=True,
        )
        partial.rename(target)
        return target


def ensure_image(podman_args: tuple[str, ...] = (), recipe: Recipe = BASE) -> str:
    """The recipe's image tag, imported into podman's store if not there yet."""
    probe = subprocess.run(
        ["podman", *podman_args, "image", "exists", recipe.tag], capture_output=True, timeout=60
    )
    if probe.returncode == 0:
        return recipe.tag
    source = tarball(recipe)
    subprocess.run(
        [
            "podman",
            *podman_args,
            "import",
            "--change",
            f"EXPOSE {recipe.expose}/tcp",
            str(source),
            recipe.tag,
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return recipe.tag
