"""Whether a container store can hold each sandbox to its disk_gb, and why not when it cannot.

Podman's overlay driver and Docker's overlay2 both limit a container's writable layer with
``--storage-opt size=<N>G`` (Docker's API: ``HostConfig.StorageOpt``) only when the store's
graph root lies on XFS mounted with project quotas (``prjquota``, which ``pquota`` shows as in
/proc/mounts): the driver gives each container a project id and a hard block limit on it. On
any other store (ext4, XFS without project quotas, a kernel without XFS quota support, which
mounts XFS with ``noquota``) the engines refuse the option and the container would not start,
so the engines pass it only when this module says the store takes it.

The check reads what the engine reports (its driver, the graph root, the filesystem under it)
and the mount holding the graph root in /proc/mounts (its type and options): two cheap reads,
done once per engine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MOUNTS", "DiskQuota", "docker_store_quota", "mount_of", "podman_store_quota"]

# Read through this name so the unit tests can point it at a file of their own.
MOUNTS = Path("/proc/mounts")
# The kernel shows a project-quota XFS mount as "prjquota" (mount's pquota and prjquota alike);
# "pqnoenforce" accounts without enforcing, which limits nothing.
_PROJECT_QUOTA = {"prjquota", "pquota"}


@dataclass(frozen=True)
class DiskQuota:
    """Whether sandboxes get their disk_gb on this store; ``reason`` says why, for the log."""

    enforced: bool
    reason: str


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str, mounts_text: str) -> tuple[str, str, tuple[str, ...]] | None:
    """The mount holding ``path`` (already resolved): (mount point, type, options), the last
    of the longest mount points (a later mount over the same point hides the earlier one)."""
    best: tuple[str, str, tuple[str, ...]] | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, fstype, options = _unescape(fields[1]), fields[2], fields[3]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype, tuple(options.split(",")))
    return best


def _store_quota(driver: str, wanted: str, backing: str, root: str, mounts_text: str) -> DiskQuota:
    where = f"graph root {root or '(unknown)'}"
    if driver != wanted:
        return DiskQuota(False, f"the storage driver is {driver or 'unknown'}, not {wanted}")
    if not root:
        return DiskQuota(False, "the engine did not report its graph root")
    mount = mount_of(root, mounts_text)
    if mount is None:
        return DiskQuota(False, f"no mount in /proc/mounts holds the {where}")
    point, fstype, options = mount
    if fstype != "xfs" or (backing and backing != "xfs"):
        return DiskQuota(
            False, f"the {where} is on {backing or fstype} ({point}), not XFS with prjquota"
        )
    if not _PROJECT_QUOTA & set(options):
        return DiskQuota(
            False,
            f"the {where} is on XFS ({point}) mounted without prjquota "
            f"(options {','.join(options)}; noquota: the kernel lacks XFS quota support or "
            "the mount did not ask for it)",
        )
    return DiskQuota(True, f"the {where} is on XFS with project quotas ({point})")


def podman_store_quota(info: Mapping[str, Any], mounts_text: str) -> DiskQuota:
    """From ``podman info --format json`` (its "store" part) and /proc/mounts."""
    store = info.get("store") or {}
    status = store.get("graphStatus") or {}
    return _store_quota(
        str(store.get("graphDriverName") or ""),
        "overlay",
        str(status.get("Backing Filesystem") or ""),
        os.path.realpath(store["graphRoot"]) if store.get("graphRoot") else "",
        mounts_text,
    )


def docker_store_quota(info: Mapping[str, Any], mounts_text: str) -> DiskQuota:
    """From Docker's ``GET /info`` (Driver, DriverStatus, DockerRootDir) and /proc/mounts.
    overlay2 keeps its layers under DockerRootDir/overlay2."""
    status = {str(pair[0]): str(pair[1]) for pair in info.get("DriverStatus") or [] if pair}
    root = str(info.get("DockerRootDir") or "")
    return _store_quota(
        str(info.get("Driver") or ""),
        "overlay2",
        status.get("Backing Filesystem", ""),
        os.path.realpath(root) if root else "",
        mounts_text,
    )


def read_mounts() -> str:
    try:
        return MOUNTS.read_text()
    except OSError:
        return ""
