"""The Podman engine: the podman CLI, rootful, every call an argv list with a timeout.

Containers are started detached (``podman run -d``): conmon parents them, not the agent, so an
agent restart leaves sandboxes and their SSH sessions running. Every MOLT container carries
LABEL_MANAGED and LABEL_REF; ``containers`` and ``remove`` never look past them.

Each container runs in a user namespace of its own (``--userns=auto``: Podman hands each one a
distinct range of the ``containers`` entry of /etc/subuid and /etc/subgid), so the buyer's root
is an unprivileged uid on the host, and with Podman's default capabilities and no more
(SANDBOX_CAPABILITIES). A network namespace the host made is owned by the host's user
namespace, where the container's root may neither mount sysfs nor set the network sysctls
Podman sets; so such a container starts with ``--network none`` (a namespace owned by its own
user namespace) and the sandbox's veth is moved in after (clawnode.sandbox.netjoin, as for
Docker), and its /etc/resolv.conf is a file the engine writes and mounts (Podman refuses
``--dns`` without a network). The job's sshd files are mounted with ``U`` (Podman chowns them
to the container's root) so sshd, root only inside, can read its host key. ``userns=""``
keeps the host's user namespace and joins the named network namespace directly.

The defaults suit a normal cgroup-v2 host (podman's own runtime and cgroup manager). Hosts like
the development machines (cgroups v1/hybrid, where crun refuses and root lacks
CAP_SYS_RESOURCE) pass ``runtime="runc"``, ``cgroup_manager="cgroupfs"`` and lowered ulimits
(docs/provider.md).

Disk per job (``disk_gb``) goes as ``--storage-opt size=<N>G`` only where the store enforces it:
the overlay driver on XFS with project quotas (clawnode.sandbox.quota, asked once). ``root`` and
``runroot`` put the engine's store elsewhere than storage.conf's (podman's --root/--runroot).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .engine import (
    LABEL_MANAGED,
    LABEL_REF,
    Container,
    ContainerSpec,
    EngineError,
    start_or_remove,
)
from .netjoin import join_netns
from .quota import DiskQuota, podman_store_quota, read_mounts

__all__ = ["DEFAULT_USERNS", "SANDBOX_CAPABILITIES", "PodmanEngine"]

# A range per container from /etc/subuid's "containers" entry; 65536 ids so every uid and gid
# a Debian or Ubuntu image ships (nobody is 65534) maps to one of its own.
DEFAULT_USERNS = "auto:size=65536"
# Podman's own default set, named so that a newer Podman's defaults change nothing here. The
# user namespace is what protects the host: in it these reach only files whose owner maps into
# the container (host-owned files show as nobody and stay out of reach). The buyer needs them as
# root on a rented machine: DAC_OVERRIDE and FOWNER for `apt-get install` (dpkg writes files
# owned by other users), KILL to stop their own processes of another uid, SETFCAP for packages
# that set file capabilities; sshd needs CHOWN, NET_BIND_SERVICE, SETGID, SETUID, SYS_CHROOT.
# No SYS_ADMIN, NET_ADMIN, NET_RAW, MKNOD or SYS_MODULE: no mounts, no network changes, no
# raw sockets, no device nodes, no modules.
SANDBOX_CAPABILITIES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
)

log = logging.getLogger(__name__)

_MAX_DETAIL = 300
# A layer line of `podman pull`: "Copying blob sha256:4f4f..." (a terminal adds "done" etc.)
_BLOB = re.compile(r"Copying blob (\S+)")


def _detail(stderr: str) -> str:
    """podman's own words, trimmed to what a buyer may read: its last error line, no argv (which
    carries the environment) and no stack of warnings before it. An error that ends "N error(s)
    occurred:" lists the causes on the lines after it ("* unlinkat ...: device or resource
    busy"); they are kept, or the message names no cause."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.lower().startswith("error")]
    if not starts:
        text = (lines or ["no message"])[-1]
    else:
        first = starts[-1]
        causes = []
        for line in lines[first + 1 :]:
            if not line.startswith("*"):
                break
            causes.append(line)
        text = " ".join([lines[first], *causes])
    text = re.sub(r"^error:\s*", "", text, flags=re.IGNORECASE)
    return text[:_MAX_DETAIL]


# `podman rm -f` stops the container, then removes its overlay. While the kernel is still
# tearing down the stopped container's mounts, that removal fails ("removing container ... root
# filesystem: 1 error occurred", seen twice in one CI run on a loaded machine) and a later try
# succeeds. A few tries a second apart before the error reaches the caller.
_REMOVE_TRIES = 4
_REMOVE_RETRY_SECONDS = 1.0
_TRANSIENT_REMOVE = ("root filesystem", "resource busy")


class PodmanEngine:
    def __init__(
        self,
        *,
        podman: str = "podman",
        runtime: str = "",
        cgroup_manager: str = "",
        ulimits: Mapping[str, int] | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 120.0,
        pull_timeout: float = 3600.0,
        workdir: str | os.PathLike[str] | None = None,
        userns: str = DEFAULT_USERNS,
        capabilities: Sequence[str] | None = SANDBOX_CAPABILITIES,
        root: str = "",
        runroot: str = "",
    ) -> None:
        self._podman = podman
        # podman's working directory, inherited by each container's conmon, which writes an
        # empty "oom" file there when the container is OOM-killed: the agent's own directory,
        # not wherever the agent was started from.
        self._cwd = os.fspath(workdir) if workdir is not None else None
        self._global: list[str] = []
        # The container store (podman's --root and --runroot); empty: storage.conf's. A store on
        # XFS with prjquota is what lets the engine enforce disk_gb (clawnode.sandbox.quota).
        if root:
            self._global += ["--root", root]
        if runroot:
            self._global += ["--runroot", runroot]
        if runtime:
            self._global += ["--runtime", runtime]
        if cgroup_manager:
            self._global += ["--cgroup-manager", cgroup_manager]
        self._global += list(extra_args)
        self._ulimits = dict(ulimits or {})
        self._timeout = timeout
        self._pull_timeout = pull_timeout
        self._userns = userns
        # None: Podman's default set (for images whose entry point needs more than sshd)
        self._capabilities = None if capabilities is None else tuple(capabilities)
        # The resolv.conf files of user-namespaced containers, one per container name.
        self._resolv_dir = Path(self._cwd or "/run/clawnode") / "resolv"
        self._quota: DiskQuota | None = None
        self._quota_lock = threading.Lock()

    # -- the CLI ------------------------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        return [self._podman, *self._global, *args]

    def _run(self, *args: str, timeout: float | None = None, check: bool = True) -> str:
        what = args[0] if args else "podman"
        try:
            done = subprocess.run(
                self._argv(*args),
                capture_output=True,
                text=True,
                timeout=timeout or self._timeout,
                check=False,
                cwd=self._cwd,
            )
        except FileNotFoundError as exc:
            raise EngineError(f"podman is not installed ({self._podman} not found)") from exc
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"podman {what} timed out after {exc.timeout:.0f} s") from exc
        if check and done.returncode != 0:
            raise EngineError(f"podman {what} failed: {_detail(done.stderr)}")
        return done.stdout

    def disk_quota(self) -> DiskQuota:
        """Whether this store holds each sandbox to its disk_gb: asked of podman once, and said
        once in the agent's log either way (a provider should know a listing's disk per job is
        not enforced, and why)."""
        with self._quota_lock:
            if self._quota is None:
                try:
                    info = json.loads(self._run("info", "--format", "json") or "{}")
                except (EngineError, json.JSONDecodeError) as exc:
                    self._quota = DiskQuota(False, f"podman info did not say ({exc})")
                else:
                    self._quota = podman_store_quota(info, read_mounts())
                if self._quota.enforced:
                    log.info("disk per job enforced: %s", self._quota.reason)
                else:
                    log.warning(
                        "disk per job (disk_gb) is NOT enforced on this podman store: %s; "
                        "sandboxes start without a disk limit (docs/provider.md)",
                        self._quota.reason,
                    )
            return self._quota

    # -- Engine -------------------------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        try:
            done = subprocess.run(
                self._argv("image", "exists", image),
                capture_output=True,
                text=True,
                timeout=self._timeout,
                check=False,
                cwd=self._cwd,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineError(f"podman image exists failed: {exc}") from exc
        if done.returncode not in (0, 1):
            raise EngineError(f"podman image exists failed: {_detail(done.stderr)}")
        return done.returncode == 0

    def pull(self, image: str, progress: Callable[[int], None]) -> None:
        """``podman pull``, its progress read from the lines it prints (best effort). Without a
        terminal podman prints one line per layer as it starts ("Copying blob sha256:..."), then
        "Copying config", "Writing manifest": no byte counts and no layer total. So each layer
        seen moves the figure towards 80 (80 * n / (n + 1)), the config to 90, the manifest to
        95, and the stored image to 100."""
        progress(0)
        try:
            proc = subprocess.Popen(
                self._argv("pull", image),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                cwd=self._cwd,
            )
        except FileNotFoundError as exc:
            raise EngineError(f"podman is not installed ({self._podman} not found)") from exc
        # The lines come as podman goes; the deadline is a timer that kills it.
        expired = threading.Event()

        def stop() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(self._pull_timeout, stop)
        timer.start()
        blobs: set[str] = set()
        shown = 0
        tail: list[str] = []
        assert proc.stderr is not None
        try:
            for line in proc.stderr:
                tail = [*tail[-20:], line]
                blob = _BLOB.search(line)
                if blob:
                    blobs.add(blob.group(1))
                    value = 80 * len(blobs) // (len(blobs) + 1)
                elif line.startswith("Copying config"):
                    value = 90
                elif line.startswith("Writing manifest"):
                    value = 95
                else:
                    continue
                if value > shown:
                    shown = value
                    progress(value)
            code = proc.wait()
        finally:
            timer.cancel()
        if code != 0:
            if expired.is_set():
                raise EngineError(f"pulling {image} timed out")
            raise EngineError(f"pulling {image} failed: {_detail(''.join(tail))}")
        progress(100)

    def start(self, spec: ContainerSpec) -> Container:
        args = ["run", "-d", "--name", spec.name, "--hostname", spec.name]
        labels = {**spec.labels, LABEL_MANAGED: "1", LABEL_REF: spec.ref}
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        if self._userns:
            args += ["--userns", self._userns, "--network", "none"]
            if spec.dns or spec.dns_search:
                resolv = self._write_resolv(spec)
                mount = f"type=bind,source={resolv},destination=/etc/resolv.conf,ro=true"
                args += ["--mount", mount]
        else:
            args += ["--network", f"ns:{spec.netns}"]
            for server in spec.dns:
                args += ["--dns", server]
            for domain in spec.dns_search:
                args += ["--dns-search", domain]
        if self._capabilities is not None:
            args += ["--cap-drop", "all"]
            for capability in self._capabilities:
                args += ["--cap-add", capability]
        for device in spec.cdi_devices:
            args += ["--device", device]
        args += [
            "--cpus",
            f"{spec.cpus_milli / 1000:.3f}",
            "--memory",
            f"{spec.memory_mb}m",
            # Equal to --memory: no swap on top, so the limit the buyer paid for is the limit.
            "--memory-swap",
            f"{spec.memory_mb}m",
            "--pids-limit",
            str(spec.pids_limit),
        ]
        # The writable layer's limit, only where the store enforces it (clawnode.sandbox.quota):
        # any other store refuses the option, and the sandbox would not start at all.
        if spec.disk_gb > 0 and self.disk_quota().enforced:
            args += ["--storage-opt", f"size={spec.disk_gb}G"]
        for limit, amount in self._ulimits.items():
            args += ["--ulimit", f"{limit}={amount}:{amount}"]
        # U: chowned to the container's root, which is not the host's root in a user namespace
        # (sshd refuses a host key it cannot read, and authorized_keys not owned by root).
        chown = ",U=true" if self._userns else ""
        for host, inside in spec.mounts.items():
            args += ["--mount", f"type=bind,source={host},destination={inside},ro=true{chown}"]
        for key, value in spec.env.items():
            args += ["--env", f"{key}={value}"]
        args += [spec.image, *spec.command]

        def launch() -> None:
            try:
                self._run(*args)
            except EngineError as exc:
                if self._userns and "subuid" in str(exc):
                    raise EngineError(
                        f"{exc} (the node's /etc/subuid and /etc/subgid need a 'containers' "
                        "entry for sandbox user namespaces)"
                    ) from exc
                raise

        def attach() -> None:
            if self._userns:
                join_netns(spec.netns, self._pid(spec.name))

        # A failed run can leave a created container behind (a CDI or mount error comes after
        # create): start_or_remove removes it.
        return start_or_remove(self, spec.name, launch, attach, self._stopped_detail)

    def _write_resolv(self, spec: ContainerSpec) -> Path:
        lines = [f"nameserver {server}" for server in spec.dns]
        if spec.dns_search:
            lines.append("search " + " ".join(spec.dns_search))
        try:
            self._resolv_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            path = self._resolv_dir / f"{spec.name}.conf"
            path.write_text("\n".join(lines) + "\n")
            # Read by the container's root, an unprivileged uid on the host.
            path.chmod(0o644)
        except OSError as exc:
            raise EngineError(f"cannot write the sandbox's resolv.conf: {exc}") from exc
        return path

    def _pid(self, name: str) -> int:
        out = self._run("inspect", "--format", "{{.State.Pid}}", name)
        pid = int(out.strip() or 0) if out.strip().isdigit() else 0
        if pid <= 0:
            raise EngineError(f"container {name} is not running right after its start")
        return pid

    def _stopped_detail(self, name: str) -> str:
        try:
            out = self._run("inspect", "--format", "{{.State.Running}}", name)
        except EngineError:
            return ""
        return self.exit_detail(name) if out.strip() == "false" else ""

    def containers(self) -> list[Container]:
        out = self._run("ps", "-a", "--filter", f"label={LABEL_MANAGED}", "--format", "json")
        rows: list[dict[str, Any]] = json.loads(out or "[]") or []
        found: list[Container] = []
        for row in rows:
            names = row.get("Names") or []
            name = names[0] if isinstance(names, list) and names else str(names)
            found.append(Container.from_row(row, name))
        return found

    def remove(self, name: str) -> None:
        # -f stops it first, -v takes its anonymous volumes, --ignore makes a missing one fine;
        # the writable layer goes with the container itself.
        for attempt in range(1, _REMOVE_TRIES + 1):
            try:
                self._run("rm", "-f", "-v", "--ignore", "--time", "2", name)
                break
            except EngineError as exc:
                transient = any(words in str(exc) for words in _TRANSIENT_REMOVE)
                if not transient or attempt == _REMOVE_TRIES:
                    raise
                time.sleep(_REMOVE_RETRY_SECONDS)
        with contextlib.suppress(OSError):
            (self._resolv_dir / f"{name}.conf").unlink(missing_ok=True)

    # -- beyond the interface -----------------------------------------------------------------

    def exposed_ports(self, image: str) -> tuple[int, ...]:
        """The TCP ports the image declares (EXPOSE), ssh's 22 left out."""
        out = self._run("image", "inspect", "--format", "{{json .Config.ExposedPorts}}", image)
        try:
            declared = json.loads(out.strip() or "null") or {}
        except json.JSONDecodeError:
            return ()
        ports: set[int] = set()
        for key in declared:
            number, _, proto = str(key).partition("/")
            if (proto or "tcp") == "tcp" and number.isdigit() and 0 < int(number) < 65536:
                ports.add(int(number))
        ports.discard(22)
        return tuple(sorted(ports))[:32]

    def exit_detail(self, name: str) -> str:
        """Why a container stopped, for a buyer: its exit code, OOM kill, and its last log line."""
        try:
            out = self._run(
                "inspect",
                "--format",
                "{{.State.ExitCode}} {{.State.OOMKilled}}",
                name,
            )
        except EngineError:
            return "the container is gone"
        code, _, oom = out.strip().partition(" ")
        text = f"the container stopped (exit code {code})"
        if oom.strip() == "true":
            text += ", killed for exceeding its memory limit"
        try:
            logs = subprocess.run(
                self._argv("logs", "--tail", "3", name),
                capture_output=True,
                text=True,
                timeout=self._timeout,
                check=False,
                cwd=self._cwd,
            )
        except (OSError, subprocess.TimeoutExpired):
            return text
        last = (logs.stdout + logs.stderr).strip().splitlines()
        if last:
            text += f": {last[-1][:200]}"
        return text
