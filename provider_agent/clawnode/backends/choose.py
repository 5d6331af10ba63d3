"""``--backend auto|kernel|userspace``: which backend runs here, and why."""

from __future__ import annotations

import errno as errno_mod
import shutil
from typing import Any

from . import links
from .errors import WireGuardError
from .kernel import KernelBackend
from .links import kernel_wireguard_available
from .userspace import UserspaceBackend

__all__ = ["BackendClass", "choose_backend", "kernel_wireguard_available_in_child"]


def kernel_wireguard_available_in_child() -> tuple[bool, str]:
    """kernel_wireguard_available, asked in a child process so this one does not import
    pyroute2 (for `clawnode run --backend auto`, which may end up on wireguard-go)."""
    try:
        available, why = links.in_child("probe-kernel")
    except WireGuardError as exc:
        return False, f"cannot probe the kernel for WireGuard: {exc}"
    return bool(available), str(why)


BackendClass = type[UserspaceBackend] | type[KernelBackend]


def choose_backend(
    kind: str,
    *,
    kernel_probe: Any = kernel_wireguard_available,
    which: Any = shutil.which,
) -> tuple[BackendClass, str]:
    """``--backend`` -> (backend class, why). ``auto``: kernel when the running kernel has
    WireGuard, else wireguard-go. Raises WireGuardError when the choice cannot work here."""
    if kind not in ("auto", "kernel", "userspace"):
        raise WireGuardError(f"backend must be auto, kernel or userspace, not {kind!r}")
    if kind in ("auto", "kernel"):
        available, why = kernel_probe()
        if available:
            return KernelBackend, f"kernel: {why}"
        if kind == "kernel":
            raise WireGuardError(f"--backend kernel cannot work here: {why}", errno_mod.EOPNOTSUPP)
    has_go = which("wireguard-go") is not None
    if kind == "userspace":
        if not has_go:
            raise WireGuardError(
                "--backend userspace needs wireguard-go on PATH (apt-get install wireguard-go)",
                errno_mod.ENOENT,
            )
        return UserspaceBackend, "userspace: wireguard-go (chosen with --backend userspace)"
    if not has_go:
        raise WireGuardError(
            f"no WireGuard here: {why}, and wireguard-go is not on PATH "
            "(apt-get install wireguard-go)",
            errno_mod.ENOENT,
        )
    return UserspaceBackend, f"userspace: wireguard-go, because {why}"
