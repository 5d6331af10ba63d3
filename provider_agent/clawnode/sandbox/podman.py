"""The Podman engine: the podman CLI, rootful, every call an argv list with a timeout.

Containers are started detached (``podman run -d``): conmon parents them, not the agent, so an
agent restart leaves sandboxes and their SSH sessions running. Every MOLT container carries
LABEL_MANAGED and LABEL_REF; ``containers`` and ``remove`` never look past them.

The defaults suit a normal cgroup-v2 host (podman's own runtime and cgroup manager). Hosts like
the development machines (cgroups v1/hybrid, where crun refuses and root lacks
CAP_SYS_RESOURCE) pass ``runtime="runc"``, ``cgroup_manager="cgroupfs"`` and lowered ulimits
(docs/provider.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .engine import LABEL_MANAGED, LABEL_REF, Container, ContainerSpec, EngineError

__all__ = ["PodmanEngine"]

_MAX_DETAIL = 300
# A layer line of `podman pull`: "Copying blob sha256:4f4f..." (a terminal adds "done" etc.)
_BLOB = re.compile(r"Copying blob (\S+)")


def _detail(stderr: str) -> str:
    """podman's own words, trimmed to what a buyer may read: its last error line, no argv (which
    carries the environment) and no stack of warnings before it."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    text = (errors or lines or ["no message"])[-1]
    text = re.sub(r"^error:\s*", "", text, flags=re.IGNORECASE)
    return text[:_MAX_DETAIL]


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
    ) -> None:
        self._podman = podman
        # podman's working directory, inherited by each container's conmon, which writes an
        # empty "oom" file there when the container is OOM-killed: the agent's own directory,
        # not wherever the agent was started from.
        self._cwd = os.fspath(workdir) if workdir is not None else None
        self._global: list[str] = []
        if runtime:
            self._global += ["--runtime", runtime]
        if cgroup_manager:
            self._global += ["--cgroup-manager", cgroup_manager]
        self._global += list(extra_args)
        self._ulimits = dict(ulimits or {})
        self._timeout = timeout
        self._pull_timeout = pull_timeout

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
        args += ["--network", f"ns:{spec.netns}"]
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
        for limit, amount in self._ulimits.items():
            args += ["--ulimit", f"{limit}={amount}:{amount}"]
        for host, inside in spec.mounts.items():
            args += ["--mount", f"type=bind,source={host},destination={inside},ro=true"]
        for key, value in spec.env.items():
            args += ["--env", f"{key}={value}"]
        args += [spec.image, *spec.command]
        try:
            self._run(*args)
        except EngineError:
            # A failed run can leave a created container behind (a CDI or mount error comes
            # after create); the interface promises nothing is.
            self.remove(spec.name)
            raise
        for container in self.containers():
            if container.name == spec.name:
                return container
        raise EngineError(f"container {spec.name} vanished right after it started")

    def containers(self) -> list[Container]:
        out = self._run("ps", "-a", "--filter", f"label={LABEL_MANAGED}", "--format", "json")
        rows: list[dict[str, Any]] = json.loads(out or "[]") or []
        found: list[Container] = []
        for row in rows:
            labels: dict[str, str] = dict(row.get("Labels") or {})
            names = row.get("Names") or []
            name = names[0] if isinstance(names, list) and names else str(names)
            state = str(row.get("State", "")).lower()
            found.append(
                Container(
                    name=name,
                    ref=labels.get(LABEL_REF, ""),
                    image=str(row.get("Image", "")),
                    running=state == "running",
                    status=state,
                    labels=labels,
                )
            )
        return found

    def remove(self, name: str) -> None:
        # -f stops it first, -v takes its anonymous volumes, --ignore makes a missing one fine;
        # the writable layer goes with the container itself.
        self._run("rm", "-f", "-v", "--ignore", "--time", "2", name)

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
