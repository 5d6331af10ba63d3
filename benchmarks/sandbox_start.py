"""Time from engine start to sshd's banner, for a job sandbox with a cached image, against a
bare ``podman run`` of the same sshd measured in the same run.

    sudo .venv/bin/python benchmarks/sandbox_start.py [--runs 10]

Root (rootful podman, a network namespace). Builds or reuses the sandbox tier's test image
(tests/sandbox/image.py). Each run, the two variants alternate:

- ``managed``: what the agent does after the pull: ``PodmanEngine.start`` with labels, two
  simulated GPUs through CDI, CPU/memory/pids limits, the job's sshd material mounted, then the
  container listing that confirms it; then ``ssh_banner_probe`` until sshd answers;
- ``managed_host_userns``: the same start with ``userns=""`` and Podman's default capabilities
  (the engine before sandboxes got user namespaces: the named namespace joined directly), so
  the user namespace's cost (Podman's ``U`` chown, the veth moved in after the start) is the
  difference between the two;
- ``floor``: ``podman run -d`` of the same image and the same sshd command and mount, joined to
  the same namespace, with nothing else; then the same probe.

Prints JSON: p50/p95 (seconds) of each, managed/managed_host_userns and managed/floor per
percentile. The engine's settings come from MOLT_PODMAN_RUNTIME, MOLT_PODMAN_CGROUP_MANAGER
and MOLT_PODMAN_ULIMITS, as in the sandbox tier (defaults: this development machine's runc,
cgroupfs, lowered ulimits).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "provider_agent"))

from clawnode.gpu import SimulatedGpuReader  # noqa: E402
from clawnode.sandbox import sshd  # noqa: E402
from clawnode.sandbox.cdi import CdiGpus  # noqa: E402
from clawnode.sandbox.engine import ContainerSpec  # noqa: E402
from clawnode.sandbox.manager import ssh_banner_probe  # noqa: E402
from clawnode.sandbox.podman import DEFAULT_USERNS, PodmanEngine  # noqa: E402

from tests.sandbox import image  # noqa: E402
from tests.sandbox.conftest import (  # noqa: E402
    ENGINE_OPTIONS,
    VethNetwork,
    podman_global_args,
    podman_ulimit_args,
)

ADDRESS = "10.254.31.2"  # the sandbox tier's test range, its own /24


def percentiles(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": round(cuts[49], 4), "p95": round(cuts[94], 4), "n": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    tag = image.ensure_image(podman_global_args())
    engine = PodmanEngine(**ENGINE_OPTIONS)  # type: ignore[arg-type]
    host_userns = PodmanEngine(**ENGINE_OPTIONS, userns="", capabilities=None)  # type: ignore[arg-type]
    network = VethNetwork()
    work = Path(tempfile.mkdtemp(prefix="molt-bench-sandbox-"))
    gpus = SimulatedGpuReader("RTX 4090:4", seed="bench").read().gpus
    # Stand-in GPU nodes in /dev, as the agent makes them (runc binds them into a user namespace)
    cdi = CdiGpus()
    cdi.prepare(gpus)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1eWVyLWtleS1mb3ItdGVzdHMtb25seS0wMDAwMDA b"
    netns = network.setup("order:bench", f"{ADDRESS}/32", "10.255.0.9/32", False)
    managed: list[float] = []
    managed_host: list[float] = []
    floor: list[float] = []
    try:
        for run in range(args.runs):
            material = sshd.write_material(work / f"job{run}", "molt-bench", (key,))
            spec = ContainerSpec(
                name="molt-bench-managed",
                ref="order:bench",
                image=tag,
                netns=netns,
                cdi_devices=cdi.devices([1, 3]),
                cpus_milli=2000,
                memory_mb=1024,
                pids_limit=1024,
                disk_gb=10,
                mounts=material.mounts,
                env=cdi.env((gpus[1], gpus[3])),
                command=material.command,
            )
            for variant, samples in ((engine, managed), (host_userns, managed_host)):
                began = time.perf_counter()
                variant.start(spec)
                ssh_banner_probe(ADDRESS, 60)
                samples.append(time.perf_counter() - began)
                variant.remove(spec.name)

            [(host_dir, inside)] = material.mounts.items()
            began = time.perf_counter()
            subprocess.run(
                [
                    "podman",
                    *podman_global_args(),
                    "run",
                    "-d",
                    "--name",
                    "molt-bench-floor",
                    *podman_ulimit_args(),
                    "--network",
                    f"ns:{netns}",
                    "--mount",
                    f"type=bind,source={host_dir},destination={inside},ro=true",
                    tag,
                    *material.command,
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
            ssh_banner_probe(ADDRESS, 60)
            floor.append(time.perf_counter() - began)
            engine.remove("molt-bench-floor")
    finally:
        engine.remove("molt-bench-managed")
        engine.remove("molt-bench-floor")
        network.teardown("order:bench")
    m, h, f = percentiles(managed), percentiles(managed_host), percentiles(floor)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {platform.node()}",
                "engine": ENGINE_OPTIONS,
                "image": tag,
                "userns": DEFAULT_USERNS,
                "managed_start_to_banner_s": m,
                "managed_host_userns_start_to_banner_s": h,
                "floor_bare_run_to_banner_s": f,
                "managed_over_managed_host_userns": {
                    "p50": round(m["p50"] / h["p50"], 3),
                    "p95": round(m["p95"] / h["p95"], 3),
                },
                "managed_over_floor": {
                    "p50": round(m["p50"] / f["p50"], 3),
                    "p95": round(m["p95"] / f["p95"], 3),
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
