"""`clawnode run` as a process: load the enrolment, choose the backend, build the Agent
(clawnode.daemon) with the real firewall, GPU reader and (with --sandbox-engine) sandbox
manager, and serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping

from .daemon import Agent, Revoked
from .gpu import GpuReader
from .sandbox.engine import Sandboxes
from .state import StateDir

__all__ = ["run_daemon"]


def sandbox_manager(
    engine: str,
    state: StateDir,
    gpus: GpuReader,
    *,
    runtime: str = "",
    cgroup_manager: str = "",
    ulimits: Mapping[str, int] | None = None,
    userns: str | None = None,
    docker_host: str = "",
    dns: tuple[str, ...] = (),
    dns_search: tuple[str, ...] = (),
) -> Sandboxes | None:
    """The sandbox manager for ``--sandbox-engine`` (None for "none": no sandboxes here).
    Imported here, not at the top: only an agent that runs sandboxes loads them."""
    if engine == "none":
        return None
    if engine not in ("podman", "docker"):
        raise ValueError(f"--sandbox-engine {engine!r} is not one of none, podman, docker")
    from .sandbox.engine import Engine
    from .sandbox.manager import SandboxManager
    from .sandbox.network import NetnsSandboxNetwork

    chosen: Engine
    if engine == "docker":
        from .sandbox.docker import DockerEngine

        chosen = DockerEngine(host=docker_host, ulimits=ulimits)
    else:
        from .sandbox.podman import DEFAULT_USERNS, PodmanEngine

        chosen = PodmanEngine(
            runtime=runtime,
            cgroup_manager=cgroup_manager,
            ulimits=ulimits,
            workdir=state.path,
            # None: a user namespace of its own for each sandbox
            userns=DEFAULT_USERNS if userns is None else userns,
        )
    return SandboxManager(
        engine=chosen,
        network=NetnsSandboxNetwork(),
        gpus=gpus,
        state_dir=state.path,
        dns=dns,
        dns_search=dns_search,
    )


class _SayHandler(logging.Handler):
    """Log records as the agent's own lines: the sandbox modules log (adoption after a restart,
    orphans removed, a sandbox failing) and, unconfigured, Python drops their INFO lines and
    prints their warnings bare on stderr."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self._say = say

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._say(record.getMessage())
        except Exception:  # a log line must never take the agent down
            self.handleError(record)


def _log_sandboxes_to(say: Callable[[str], None]) -> None:
    logger = logging.getLogger("clawnode.sandbox")
    if not any(isinstance(h, _SayHandler) for h in logger.handlers):
        logger.addHandler(_SayHandler(say))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_daemon(
    state_dir: str,
    *,
    backend: str | None,
    simulated_gpus: str,
    simulated_gpus_file: str = "",
    sandbox_engine: str = "none",
    images: tuple[str, ...] = (),
    container_runtime: str = "",
    cgroup_manager: str = "",
    container_userns: str | None = None,
    container_ulimits: Mapping[str, int] | None = None,
    docker_host: str = "",
    names: bool = True,
    say: Callable[[str], None],
) -> int:
    """`clawnode run`: load the enrolment, bring the interface up, serve until SIGTERM.
    Exit status: 0 on SIGTERM/SIGINT, 1 on a local error, 3 when the gateway refuses the node."""
    from .backends.choose import choose_backend, kernel_wireguard_available_in_child
    from .firewall import NftFirewall
    from .gpu import NvmlGpuReader, RecordedGpuReader, SimulatedGpuReader
    from .names import NamesResponder
    from .rtt import IcmpPinger
    from .sandbox.network import GATEWAY

    if sandbox_engine != "none":
        _log_sandboxes_to(say)
    state = StateDir(state_dir)
    enrollment = state.load_enrollment()
    identity = state.load_identity()
    if enrollment is None or identity is None:
        say(f"not enrolled ({state.path}): run `clawnode join --gateway URL --token TOKEN` first")
        return 1
    # `auto` asks a child process whether the kernel has WireGuard: asking here would import
    # pyroute2 (8 MB for good) into an agent that may well end up on wireguard-go.
    backend_class, why = choose_backend(
        backend or enrollment.backend, kernel_probe=kernel_wireguard_available_in_child
    )
    say(f"backend: {why}")
    reader: GpuReader
    if simulated_gpus_file:
        reader = RecordedGpuReader(simulated_gpus_file)
    elif simulated_gpus:
        # Seeded by the node id: the same simulated UUIDs as `join` reported.
        reader = SimulatedGpuReader(simulated_gpus, seed=identity.node_id)
    else:
        reader = NvmlGpuReader()
    # The names responder (clawnode.names) serves the sandboxes of this node on their gateway
    # address and the buyers on the node's mesh address; a node without sandboxes has no names.
    responder = (
        NamesResponder((enrollment.mesh_address, GATEWAY), say=say)
        if names and sandbox_engine != "none"
        else None
    )
    agent = Agent(
        state=state,
        enrollment=enrollment,
        identity=identity,
        backend=backend_class(),
        firewall=NftFirewall(names=responder is not None),
        gpus=reader,
        sandboxes=sandbox_manager(
            sandbox_engine,
            state,
            reader,
            runtime=container_runtime,
            cgroup_manager=cgroup_manager,
            ulimits=container_ulimits,
            userns=container_userns,
            docker_host=docker_host,
            dns=(GATEWAY,) if responder is not None else (),
            dns_search=("molt",) if responder is not None else (),
        ),
        images=images,
        names=responder,
        pinger=IcmpPinger(),
        say=say,
    )
    if sandbox_engine == "none":
        say("sandboxes: none (no --sandbox-engine): jobs asking for one are reported failed")
    else:
        say(f"sandboxes: {sandbox_engine}; images offered: {', '.join(images) or 'none'}")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if responder is not None:
            try:
                await responder.start()
            except OSError as exc:
                say(f"names: cannot serve DNS on {', '.join(responder.addresses)}: {exc}")
                return 1
            say(f"names: answering on {', '.join(responder.addresses)} port {responder.port}")
        try:
            await agent.run(stop)
        except Revoked as exc:
            say(f"the gateway refused this node ({exc}): enrol again with clawnode join")
            return 3
        finally:
            if responder is not None:
                await responder.stop()
        say("stopped; the interface and its peers stay as the last desired state said")
        return 0

    return asyncio.run(main())
