"""The agent's job sandboxes (engine.Sandboxes): one container per desired SandboxSpec.

``apply`` removes what is no longer desired before it returns (container first, then its
network; the daemon removes the peer after) and starts new sandboxes in background threads:
pull if the image is missing ("pulling", with progress), the network namespace, the GPUs' CDI
spec, fresh sshd material, ``engine.start`` ("starting"), then the readiness probe until sshd
answers with its banner ("ready"). Any error: "failed", with a detail the buyer may read.

Restart-safe: containers are never the agent's children. A new manager lists the containers the
engine has; the first ``apply`` adopts the running ones whose ref is desired (no restart: the
buyer's SSH sessions go on) and every ``apply`` removes orphans (containers or namespaces whose
ref is not desired). A desired sandbox whose container stopped is reported failed, not
restarted: its PID 1 is sshd, so it stopped because the job's own processes killed it or ran it
out of memory, and a silent restart would bill the buyer for a machine whose state they lost
without being told. The gateway fails the order and settles it as for any other failure.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .. import wire
from ..gpu import GpuReader
from . import sshd
from .cdi import CdiGpus
from .engine import Container, ContainerSpec, Engine, EngineError, SandboxNetwork

__all__ = ["Probe", "SandboxManager", "container_name", "ssh_banner_probe"]

log = logging.getLogger(__name__)

# A sandbox whose worker has not yet said whether it pulls: internal, never reported.
PENDING = "pending"

# host, timeout in seconds; returns when sshd answered, raises EngineError when it did not
Probe = Callable[[str, float], None]


def ssh_banner_probe(host: str, timeout: float, port: int = 22) -> None:
    """Wait until ``host:port`` answers with an SSH identification line ("SSH-2.0-...")."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as conn:
                conn.settimeout(2)
                banner = conn.recv(256)
            if banner.startswith(b"SSH-"):
                return
            last = f"answered {banner[:40]!r}, not an SSH banner"
        except OSError as exc:
            last = exc.strerror or str(exc)
        if time.monotonic() >= deadline:
            raise EngineError(
                f"sshd did not answer on {host}:{port} within {timeout:.0f} s ({last})"
            )
        time.sleep(0.1)


def container_name(ref: str) -> str:
    """The container's name for a ref: "order:42" -> "molt-order-42"."""
    return "molt-" + re.sub(r"[^A-Za-z0-9_.-]", "-", ref)


class _Inspecting(Protocol):
    # What PodmanEngine and MemoryEngine offer beyond engine.Engine; optional for other engines.
    def exposed_ports(self, image: str) -> tuple[int, ...]: ...

    def exit_detail(self, name: str) -> str: ...


@dataclass
class _Sandbox:
    spec: wire.SandboxSpec
    name: str
    state: str = "starting"
    detail: str = ""
    progress: int = 0
    gpus: tuple[wire.GpuInfo, ...] = ()
    host_keys: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    changed: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Held by whoever changes the sandbox's container or network (the start worker for each
    # step, apply for the removal), so a removal never interleaves with a start's step.
    step: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def report(self) -> wire.SandboxReport:
        return wire.SandboxReport(
            ref=self.spec.ref,
            state=self.state,  # type: ignore[arg-type]  # one of SANDBOX_STATES by construction
            detail=self.detail[:500],
            progress=self.progress,
            gpus=self.gpus,
            host_keys=self.host_keys,
            ports=self.ports,
        )


class SandboxManager:
    def __init__(
        self,
        engine: Engine,
        network: SandboxNetwork,
        gpus: GpuReader,
        state_dir: Path,
        probe: Probe = ssh_banner_probe,
        *,
        cdi: CdiGpus | None = None,
        probe_timeout: float = 60.0,
        check_interval: float = 5.0,
        on_change: Callable[[], None] | None = None,
        dns: tuple[str, ...] = (),
        dns_search: tuple[str, ...] = (),
    ) -> None:
        self._engine = engine
        # Where the sandboxes ask names (clawnode.names): the agent's responder, when it runs
        self._dns = dns
        self._dns_search = dns_search
        self._network = network
        self._gpus = gpus
        self._dir = Path(state_dir)
        self._probe = probe
        self._cdi = cdi if cdi is not None else CdiGpus()
        self._probe_timeout = probe_timeout
        self._check_interval = check_interval
        self._on_change = on_change
        self._lock = threading.Lock()
        self._sandboxes: dict[str, _Sandbox] = {}
        self._stopped: list[_Sandbox] = []
        self._workers: list[threading.Thread] = []
        self._applied = False
        self._deferred: tuple[wire.SandboxSpec, ...] | None = None
        self._last_check = 0.0
        # What an earlier agent process left running; adopted or removed by the first apply.
        try:
            self._found: list[Container] | None = engine.containers()
        except EngineError as exc:
            log.warning("cannot list sandbox containers yet (%s); retrying at the first apply", exc)
            self._found = None

    # -- Sandboxes ----------------------------------------------------------------------------

    def apply(self, desired: tuple[wire.SandboxSpec, ...]) -> None:
        want = {spec.ref: spec for spec in desired}
        with self._lock:
            first = not self._applied
            self._applied = True
            going = [sb for ref, sb in self._sandboxes.items() if ref not in want]
            for sb in going:
                del self._sandboxes[sb.spec.ref]
        for sb in going:
            self._remove(sb)
        try:
            present = self._engine.containers()
        except EngineError as exc:
            log.warning("cannot list sandbox containers: %s", exc)
            present = None
        if first:
            found = present if present is not None else self._found
            if found is None:
                # Nothing known of what an earlier agent left running: starting now would
                # replace a buyer's running sandbox. Try again from reports().
                with self._lock:
                    self._applied = False
                    self._deferred = desired
                return
            self._adopt(want, found)
        self._deferred = None
        self._remove_orphans(want, present)
        with self._lock:
            for ref, spec in want.items():
                if ref in self._sandboxes:
                    continue
                # Unreported until its worker knows whether it pulls: a "starting" sent now and a
                # "pulling" after it would go backwards, and the gateway ignores a state that
                # goes back (meshnet.sandboxes), so the buyer would never see the pull.
                sb = _Sandbox(spec, container_name(ref), state=PENDING)
                self._sandboxes[ref] = sb
                sb.thread = threading.Thread(
                    target=self._start, args=(sb,), name=f"sandbox {ref}", daemon=True
                )
                sb.thread.start()
                self._workers.append(sb.thread)
        self._changed()

    def reports(self, *, changed_only: bool) -> list[wire.SandboxReport]:
        if self._deferred is not None:
            self.apply(self._deferred)
        self._check_alive()
        with self._lock:
            chosen = [
                sb
                for sb in [*self._sandboxes.values(), *self._stopped]
                if (sb.changed or not changed_only) and sb.state != PENDING
            ]
            for sb in chosen:
                sb.changed = False
            self._stopped.clear()
            return [sb.report() for sb in chosen]

    # -- for tests and shutdown ---------------------------------------------------------------

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Wait for every start in progress to end (ready, failed, or abandoned by a removal)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._workers = [thread for thread in self._workers if thread.is_alive()]
            threads = list(self._workers)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- internals ----------------------------------------------------------------------------

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _set(self, sb: _Sandbox, state: str, detail: str = "", progress: int | None = None) -> None:
        with self._lock:
            if sb.cancelled.is_set():
                return  # removed meanwhile: "stopped" is its last word
            sb.state = state
            sb.detail = detail
            if progress is not None:
                sb.progress = progress
            sb.changed = True
        self._changed()

    def _progress(self, sb: _Sandbox, value: int) -> None:
        value = max(0, min(100, int(value)))
        with self._lock:
            if value == sb.progress or sb.cancelled.is_set():
                return
            sb.progress = value
            sb.changed = True
        self._changed()

    def _job_dir(self, sb: _Sandbox) -> Path:
        return self._dir / sb.name

    def _assigned(
        self, spec: wire.SandboxSpec
    ) -> tuple[tuple[wire.GpuInfo, ...], list[wire.GpuInfo]]:
        inventory = list(self._gpus.read().gpus)
        by_index = {gpu.index: gpu for gpu in inventory}
        missing = [index for index in spec.gpus if index not in by_index]
        if missing:
            raise EngineError(f"GPU {missing[0]} is not on this node")
        return tuple(by_index[index] for index in sorted(spec.gpus)), inventory

    def _ports(self, image: str) -> tuple[int, ...]:
        reader = getattr(self._engine, "exposed_ports", None)
        if reader is None:
            return ()
        try:
            return tuple(reader(image))
        except EngineError as exc:
            log.info("cannot read the exposed ports of %s: %s", image, exc)
            return ()

    def _exit_detail(self, name: str) -> str:
        explain = getattr(self._engine, "exit_detail", None)
        return str(explain(name)) if explain is not None else "the container stopped"

    def _start(self, sb: _Sandbox) -> None:
        spec = sb.spec
        try:
            # First of all: its existence tells a restarted agent that this start began.
            self._job_dir(sb).mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self._engine.has_image(spec.image):
                self._set(sb, "pulling", progress=0)
                self._engine.pull(spec.image, lambda value: self._progress(sb, value))
            if sb.cancelled.is_set():
                return
            self._set(sb, "starting", progress=100)
            with sb.step:
                if sb.cancelled.is_set():
                    return
                assigned, inventory = self._assigned(spec)
                if assigned:
                    self._cdi.prepare(inventory)
                env = self._cdi.env(assigned)
                netns = self._network.setup(spec.ref, spec.address, spec.peer_address, spec.egress)
                try:
                    material = sshd.write_material(self._job_dir(sb), sb.name, spec.ssh_keys, env)
                except OSError as exc:
                    raise EngineError(f"cannot write the job's sshd files: {exc}") from exc
                # A container of this name left by a start cut short (agent killed mid-start).
                self._engine.remove(sb.name)
                self._engine.start(
                    ContainerSpec(
                        name=sb.name,
                        ref=spec.ref,
                        image=spec.image,
                        netns=netns,
                        cdi_devices=self._cdi.devices(spec.gpus),
                        cpus_milli=spec.cpus,
                        memory_mb=spec.memory_mb,
                        pids_limit=spec.pids_limit,
                        disk_gb=spec.disk_gb,
                        mounts=material.mounts,
                        env=env,
                        command=material.command,
                        dns=self._dns,
                        dns_search=self._dns_search,
                    )
                )
                with self._lock:
                    sb.gpus = assigned
                    sb.host_keys = material.host_keys
            ports = self._ports(spec.image)
            with self._lock:
                sb.ports = ports
            host = spec.address.split("/")[0]
            try:
                self._probe(host, self._probe_timeout)
            except EngineError as exc:
                if not self._running(sb.name):
                    raise EngineError(self._exit_detail(sb.name)) from exc
                raise
            with sb.step:
                if sb.cancelled.is_set():
                    return
                self._set(sb, "ready")
        except (EngineError, OSError) as exc:
            log.warning("sandbox %s failed: %s", spec.ref, exc)
            with sb.step:
                if sb.cancelled.is_set():
                    return
                # The failed container holds the job's GPUs and memory: free them now; the
                # network goes when the gateway drops the sandbox.
                try:
                    self._engine.remove(sb.name)
                except EngineError as gone:
                    log.warning("cannot remove failed sandbox %s: %s", sb.name, gone)
                self._set(sb, "failed", str(exc) or type(exc).__name__)

    def _running(self, name: str) -> bool:
        try:
            return any(c.name == name and c.running for c in self._engine.containers())
        except EngineError:
            return True  # unknown: keep the probe's own message

    def _remove(self, sb: _Sandbox) -> None:
        sb.cancelled.set()
        with sb.step:
            try:
                self._engine.remove(sb.name)
            except EngineError as exc:
                # The next apply's orphan sweep tries again; the peer goes regardless, so the
                # buyer's access ends with it.
                log.warning("cannot remove sandbox container %s: %s", sb.name, exc)
            try:
                self._network.teardown(sb.spec.ref)
            except (EngineError, OSError) as exc:
                log.warning("cannot remove the network of sandbox %s: %s", sb.spec.ref, exc)
            shutil.rmtree(self._job_dir(sb), ignore_errors=True)
        with self._lock:
            sb.state = "stopped"
            sb.detail = ""
            sb.changed = True
            self._stopped.append(sb)

    def _adopt(self, want: dict[str, wire.SandboxSpec], found: Sequence[Container]) -> None:
        for container in found:
            spec = want.get(container.ref)
            if spec is None or container.name != container_name(spec.ref):
                continue
            sb = _Sandbox(spec, container.name)
            try:
                sb.gpus, _ = self._assigned(spec)
            except EngineError:
                sb.gpus = ()
            sb.host_keys = sshd.read_host_keys(self._job_dir(sb))
            sb.ports = self._ports(spec.image)
            if container.running and sb.host_keys:
                sb.state = "ready"
            elif container.running:
                sb.state, sb.detail = "failed", "the job's host key is lost (state dir reset)"
            else:
                sb.state, sb.detail = "failed", self._exit_detail(container.name)
            log.info("sandbox %s found after restart: %s", spec.ref, sb.state)
            with self._lock:
                self._sandboxes[spec.ref] = sb
        # A job directory is made when a start begins and removed with the sandbox: one without
        # a container means an earlier agent began (or finished, or failed) this sandbox and its
        # container is gone. Starting it again would hand the buyer a fresh machine under the
        # same order without telling them; the gateway fails the order instead.
        for ref, spec in want.items():
            name = container_name(ref)
            with self._lock:
                if ref in self._sandboxes:
                    continue
            if not (self._dir / name).is_dir():
                continue
            sb = _Sandbox(
                spec,
                name,
                state="failed",
                detail="the sandbox's container is gone (removed while the agent was down, "
                "or the agent stopped while starting it)",
            )
            log.info("sandbox %s: job directory without a container, reported failed", ref)
            with self._lock:
                self._sandboxes[ref] = sb

    def _remove_orphans(
        self, want: dict[str, wire.SandboxSpec], present: list[Container] | None
    ) -> None:
        for container in present or []:
            if container.ref in want and container.name == container_name(container.ref):
                continue
            log.info("removing orphan sandbox container %s", container.name)
            try:
                self._engine.remove(container.name)
            except EngineError as exc:
                log.warning("cannot remove orphan container %s: %s", container.name, exc)
        try:
            refs = self._network.present()
        except (EngineError, OSError) as exc:
            log.warning("cannot list sandbox networks: %s", exc)
            return
        for ref in refs - set(want):
            log.info("removing orphan sandbox network %s", ref)
            try:
                self._network.teardown(ref)
            except (EngineError, OSError) as exc:
                log.warning("cannot remove orphan network %s: %s", ref, exc)

    def _check_alive(self) -> None:
        """A ready sandbox whose container stopped (or vanished) turns failed."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_check < self._check_interval:
                return
            self._last_check = now
            ready = [sb for sb in self._sandboxes.values() if sb.state == "ready"]
        if not ready:
            return
        try:
            running = {c.name for c in self._engine.containers() if c.running}
        except EngineError as exc:
            log.warning("cannot check sandbox containers: %s", exc)
            return
        for sb in ready:
            if sb.name in running:
                continue
            with sb.step:
                if sb.cancelled.is_set() or sb.state != "ready":
                    continue
                self._set(sb, "failed", self._exit_detail(sb.name))
