"""`make run`'s demo providers: one clawnode agent per demo node, SIMULATED, in this one process.

Each agent is the real daemon (clawnode.daemon.Agent) with the identity and enrolment that
`seed_demo --agents-dir` left in DIR/<hostname>/: it authenticates with its node's Ed25519 key,
signs its metering samples and acknowledgements, and applies the gateway's signed desired state,
over the same agent websocket a real node uses. What is simulated is the machine under it:
  - the WireGuard interface is the in-memory backend (clawnode.backends.memory): peers are
    recorded and acknowledged but no packet moves, so a buyer's tunnel to a demo node never
    carries traffic;
  - the firewall is the in-memory one, and the GPUs are those enrolled (marked simulated);
  - no sandbox engine: the demo nodes offer no images, so their listings take plain orders.
One process for all nine, not nine `clawnode run`s: each would be a Python interpreter of its
own (about 40 MB each) for agents that mostly sleep between heartbeats.

Usage: python scripts/demo_agents.py DIR   (SIGINT/SIGTERM stop every agent)
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent, Revoked
from clawnode.firewall import FakeFirewall
from clawnode.gpu import RecordedGpuReader
from clawnode.state import StateDir

DEMO_GPUS_FILE = "demo-gpus.json"  # as marketplace.demo_data writes it


_OUTPUT = threading.Lock()  # agents log from worker threads too (bring_up): one line at a time


def say_as(name: str):
    def say(line: str) -> None:
        with _OUTPUT:
            print(f"[{name}] {line}", flush=True)

    return say


def wait_for_gateway(base_url: str, stop: threading.Event, timeout: float = 120.0) -> bool:
    """Wait until the gateway answers /healthz/ (make run starts web alongside us), so the log
    shows no connection-refused retries from nine agents while it starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(f"{base_url}/healthz/", timeout=2):  # noqa: S310
                return True
        except OSError:
            stop.wait(0.5)
    return False


def load_agents(root: Path) -> list[Agent]:
    agents = []
    for path in sorted(p for p in root.iterdir() if (p / "enrollment.json").exists()):
        state = StateDir(path)
        enrollment, identity = state.load_enrollment(), state.load_identity()
        if enrollment is None or identity is None:
            continue
        agents.append(
            Agent(
                state=state,
                enrollment=enrollment,
                identity=identity,
                backend=FakeBackend(),
                firewall=FakeFirewall(),
                gpus=RecordedGpuReader(str(path / DEMO_GPUS_FILE)),
                say=say_as(path.name),
            )
        )
    return agents


async def run_one(agent: Agent, stop: asyncio.Event) -> None:
    try:
        await agent.run(stop)
    except Revoked as exc:
        agent.say(f"the gateway refused this node ({exc}); it stays offline")


async def main(root: Path) -> int:
    agents = load_agents(root)
    if not agents:
        print(f"demo agents: none enrolled in {root} (seed_demo --agents-dir)", flush=True)
        return 1
    print(
        f"demo agents: {len(agents)} SIMULATED nodes (in-memory WireGuard, no packets move; "
        "simulated GPUs) speaking the signed agent protocol to "
        f"{agents[0].enrollment.gateway}",
        flush=True,
    )
    stop = asyncio.Event()
    stopping = threading.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: (stop.set(), stopping.set()))
    # Past the timeout they start anyway: each agent retries on its own, with backoff.
    await asyncio.to_thread(wait_for_gateway, agents[0].enrollment.gateway, stopping)
    await asyncio.gather(*(run_one(agent, stop) for agent in agents))
    print("demo agents: stopped", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.rsplit("Usage: ", 1)[1])
    sys.exit(asyncio.run(main(Path(sys.argv[1]))))
