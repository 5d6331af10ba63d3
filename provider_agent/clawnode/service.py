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
) -> Sandboxes | None:
    """The sandbox manager for ``--sandbox-engine`` (None for "none": no sandboxes here).
    Imported here, not at the top: only an agent that runs sandboxes loads them."""
    if engine == "none":
        return None
    if engine != "podman":
        raise ValueError(f"--sandbox-engine {engine!r} is not one of none, podman")
    from .sandbox.manager import SandboxManager
    from .sandbox.network import NetnsSandboxNetwork
    from .sandbox.podman import PodmanEngine

    return SandboxManager(
        engine=PodmanEngine(
            runtime=runtime, cgroup_manager=cgroup_manager, ulimits=ulimits, workdir=state.path
        ),
        network=NetnsSandboxNetwork(),
        gpus=gpus,
        state_dir=state.path,
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
    sandbox_engine: str = "none",
    images: tuple[str, ...] = (),
    container_runtime: str = "",
    cgroup_manager: str = "",
    container_ulimits: Mapping[str, int] | None = None,
    say: Callable[[str], None],
) -> int:
    """`clawnode run`: load the enrolment, bring the interface up, serve until SIGTERM.
    Exit status: 0 on SIGTERM/SIGINT, 1 on a local error, 3 when the gateway refuses the node."""
    from .backends.choose import choose_backend, kernel_wireguard_available_in_child
    from .firewall import NftFirewall
    from .gpu import NvmlGpuReader, SimulatedGpuReader

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
    reader: GpuReader = (
        # Seeded by the node id: the same simulated UUIDs as `join` reported.
        SimulatedGpuReader(simulated_gpus, seed=identity.node_id)
        if simulated_gpus
        else NvmlGpuReader()
    )
    agent = Agent(
        state=state,
        enrollment=enrollment,
        identity=identity,
        backend=backend_class(),
        firewall=NftFirewall(),
        gpus=reader,
        sandboxes=sandbox_manager(
            sandbox_engine,
            state,
            reader,
            runtime=container_runtime,
            cgroup_manager=cgroup_manager,
            ulimits=container_ulimits,
        ),
        images=images,
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
        try:
            await agent.run(stop)
        except Revoked as exc:
            say(f"the gateway refused this node ({exc}): enrol again with clawnode join")
            return 3
        say("stopped; the interface and its peers stay as the last desired state said")
        return 0

    return asyncio.run(main())
