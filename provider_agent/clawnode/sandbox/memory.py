"""An in-memory Engine for unit tests of the manager's state machine: no processes, the same
interface and the same promises (nothing left behind by a failed start, idempotent remove).

Tests script it: ``images`` (present), ``pull_fails``/``start_fails`` (image -> message),
``kill(name)`` to make a running container exit as a crash would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from .engine import LABEL_MANAGED, LABEL_REF, Container, ContainerSpec, EngineError

__all__ = ["MemoryEngine"]


class MemoryEngine:
    def __init__(self, images: set[str] | None = None) -> None:
        self.images: set[str] = set(images or ())
        self.pull_fails: dict[str, str] = {}
        self.start_fails: dict[str, str] = {}
        self.ports: dict[str, tuple[int, ...]] = {}
        self.specs: dict[str, ContainerSpec] = {}
        self.started: list[str] = []  # every start, in order (a restart shows twice)
        self.removed: list[str] = []
        self.listing_fails = ""  # set: containers() raises EngineError with it
        # Set by a test to hold pulls until it lets them go (the manager's "pulling" state).
        self.pull_gate = threading.Event()
        self.pull_gate.set()
        self._containers: dict[str, Container] = {}
        self._lock = threading.Lock()

    def has_image(self, image: str) -> bool:
        with self._lock:
            return image in self.images

    def pull(self, image: str, progress: Callable[[int], None]) -> None:
        progress(0)
        self.pull_gate.wait(timeout=30)
        if image in self.pull_fails:
            raise EngineError(self.pull_fails[image])
        progress(50)
        with self._lock:
            self.images.add(image)
        progress(100)

    def start(self, spec: ContainerSpec) -> Container:
        with self._lock:
            if spec.image not in self.images:
                raise EngineError(f"image not known: {spec.image}")
            if spec.image in self.start_fails:
                raise EngineError(self.start_fails[spec.image])
            if spec.name in self._containers:
                raise EngineError(f"the container name {spec.name!r} is already in use")
            labels = {**spec.labels, LABEL_MANAGED: "1", LABEL_REF: spec.ref}
            container = Container(spec.name, spec.ref, spec.image, True, "running", labels)
            self._containers[spec.name] = container
            self.specs[spec.name] = spec
            self.started.append(spec.name)
            return container

    def containers(self) -> list[Container]:
        if self.listing_fails:
            raise EngineError(self.listing_fails)
        with self._lock:
            return list(self._containers.values())

    def remove(self, name: str) -> None:
        with self._lock:
            if self._containers.pop(name, None) is not None:
                self.removed.append(name)

    def exposed_ports(self, image: str) -> tuple[int, ...]:
        return self.ports.get(image, ())

    def exit_detail(self, name: str) -> str:
        return "the container stopped (exit code 137)"

    # -- test controls --------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        with self._lock:
            self._containers[name] = replace(self._containers[name], running=False, status="exited")

    def adopt(self, spec: ContainerSpec) -> None:
        """A container left running by an earlier agent process."""
        with self._lock:
            labels = {LABEL_MANAGED: "1", LABEL_REF: spec.ref}
            self._containers[spec.name] = Container(
                spec.name, spec.ref, spec.image, True, "running", labels
            )
