"""The container engine behind a job's sandbox, as the agent sees it: one interface, Podman by
default (clawnode.sandbox.podman), Docker as the alternative, an in-memory double for unit
tests. The agent never keeps a container as its child: engines start them detached (conmon or
containerd parents them), so an agent restart leaves running sandboxes and SSH sessions alone;
what runs is found again by the labels every MOLT container carries.

The network is not the engine's: the agent makes the sandbox's network namespace (veth,
address, routes, nftables) first and hands its path over; the engine joins the container to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import wire

# Every container the agent starts carries these labels; nothing without them is touched.
LABEL_MANAGED = "molt.managed"
LABEL_REF = "molt.ref"


class EngineError(RuntimeError):
    """The engine refused or failed; the message is fit to show the buyer (no secrets)."""


@dataclass(frozen=True)
class ContainerSpec:
    """What the engine needs to start one sandbox."""

    name: str  # the container's name, unique on the node: "molt-" + the ref, sanitised
    ref: str  # the job's ref ("order:42"), also LABEL_REF
    image: str
    netns: str  # path of the network namespace to join, e.g. /var/run/netns/molt-order-42
    cdi_devices: tuple[str, ...]  # e.g. ("nvidia.com/gpu=0", "nvidia.com/gpu=3")
    cpus_milli: int
    memory_mb: int
    pids_limit: int
    disk_gb: int
    # Read-only bind mounts host path -> container path (the job's sshd config, host key and
    # authorized_keys, written fresh by the agent for this job)
    mounts: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    # The container's /etc/resolv.conf: nameservers and search domains (the node's names
    # responder on the sandbox's gateway address, clawnode.names); empty: the engine's default.
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()


@dataclass(frozen=True)
class Container:
    """A MOLT container as the engine reports it."""

    name: str
    ref: str
    image: str
    running: bool
    status: str  # the engine's own word: "running", "exited", "created", ...
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], name: str) -> Container:
        """A container from a row of the engine's list (Docker's API and `podman ps` spell the
        labels, image and state the same; each engine reads the name its own way)."""
        labels: dict[str, str] = dict(row.get("Labels") or {})
        state = str(row.get("State", "")).lower()
        return cls(
            name=name,
            ref=labels.get(LABEL_REF, ""),
            image=str(row.get("Image", "")),
            running=state == "running",
            status=state,
            labels=labels,
        )


class Engine(Protocol):
    def has_image(self, image: str) -> bool: ...

    def pull(self, image: str, progress: Callable[[int], None]) -> None:
        """Fetch ``image``; ``progress`` gets 0-100 as it goes. Raises EngineError."""
        ...

    def start(self, spec: ContainerSpec) -> Container:
        """Create and start the container, detached. Raises EngineError (nothing left behind)."""
        ...

    def containers(self) -> list[Container]:
        """Every container carrying LABEL_MANAGED, running or not."""
        ...

    def remove(self, name: str) -> None:
        """Stop and remove the container with its writable layer; one already gone is fine."""
        ...


def start_or_remove(
    engine: Engine,
    name: str,
    launch: Callable[[], None],
    attach: Callable[[], None],
    stopped_detail: Callable[[str], str],
) -> Container:
    """The start path both real engines share: `launch` creates and starts the container,
    `attach` checks it and joins it to its network. On an EngineError whatever was created is
    removed (Engine.start promises nothing is left behind); when the container had started and
    has already exited (a command that fails at once makes the network join fail), the error
    says why it stopped (`stopped_detail`, empty when it still runs), not the join's error."""
    started = False
    try:
        launch()
        started = True
        attach()
    except EngineError as exc:
        detail = stopped_detail(name) if started else ""
        engine.remove(name)
        if detail:
            raise EngineError(detail) from exc
        raise
    for container in engine.containers():
        if container.name == name:
            return container
    raise EngineError(f"container {name} vanished right after it started")


class SandboxNetwork(Protocol):
    """The sandbox's network on the node (clawnode.sandbox.network): a network namespace per
    sandbox, a veth to the host carrying the sandbox's address, routes, and the nftables rules
    that let the job's peer reach this sandbox only (clawnode.firewall)."""

    def setup(self, ref: str, address: str, peer_address: str, egress: bool) -> str:
        """Make (or find, unchanged) the namespace and veth of ``ref``; returns the namespace's
        path for ContainerSpec.netns. ``address`` and ``peer_address`` as "a.b.c.d/32"."""
        ...

    def teardown(self, ref: str) -> None:
        """Remove the namespace and veth of ``ref``; one already gone is fine."""
        ...

    def present(self) -> set[str]:
        """The refs whose namespaces exist (after an agent restart: what to reconcile)."""
        ...


class Sandboxes(Protocol):
    """What the daemon drives (clawnode.sandbox.manager.SandboxManager): it hands over each
    applied desired state's sandboxes and sends what changed as SANDBOX_STATUS.

    ``apply`` returns promptly: it removes the sandboxes no longer desired before returning
    (container first, then its network), so the daemon removes their peers after; starting new
    ones (pull, start, wait for sshd) goes on in the background and shows in ``reports``."""

    def apply(self, desired: tuple[wire.SandboxSpec, ...]) -> None: ...

    def reports(self, *, changed_only: bool) -> list[wire.SandboxReport]:
        """Every sandbox's report, or (changed_only) those changed since the last call."""
        ...
