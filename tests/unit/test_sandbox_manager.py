"""The sandbox manager's state machine against the in-memory engine (clawnode.sandbox.memory):
pulling -> starting -> ready | failed, removal order, adoption after an agent restart, orphans,
a container that dies. The sandbox tier runs the same manager against real podman and ssh."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from clawnode import wire
from clawnode.gpu import SimulatedGpuReader
from clawnode.sandbox import sshd
from clawnode.sandbox.cdi import CdiGpus
from clawnode.sandbox.engine import ContainerSpec, EngineError
from clawnode.sandbox.manager import SandboxManager, container_name
from clawnode.sandbox.memory import MemoryEngine

pytestmark = [pytest.mark.unit]

IMAGE = "registry.example/molt/pytorch:2"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1eWVyLWtleS1mb3ItdGVzdHMtb25seS0wMDAwMDA alice"
GPUS = SimulatedGpuReader("RTX 4090:4", seed="unit").read()


class Inventory:
    def read(self):
        return GPUS


class UnprivilegedCdi(CdiGpus):
    """The real device naming and environment; the spec writing (mknod, root only) is recorded
    instead (test_sandbox_material.py and the sandbox tier prove it)."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[tuple[wire.GpuInfo, ...]] = []

    def prepare(self, gpus):
        self.prepared.append(tuple(gpus))


class MemoryNetwork:
    """Records what the manager asked of the network, and what containers existed then."""

    def __init__(self, engine: MemoryEngine) -> None:
        self.engine = engine
        self.refs: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.containers_at_teardown: dict[str, list[str]] = {}

    def setup(self, ref, address, peer_address, egress):
        self.calls.append(("setup", ref))
        self.refs.add(ref)
        return f"/var/run/netns/{container_name(ref)}"

    def teardown(self, ref):
        self.calls.append(("teardown", ref))
        self.containers_at_teardown[ref] = [c.ref for c in self.engine.containers()]
        self.refs.discard(ref)

    def present(self):
        return set(self.refs)


class Probe:
    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.failing: set[str] = set()

    def __call__(self, host: str, timeout: float) -> None:
        self.hosts.append(host)
        if host in self.failing:
            raise EngineError(f"sshd did not answer on {host}:22 within {timeout:.0f} s")


def sandbox(n: int, *, gpus=(1, 3), image=IMAGE) -> wire.SandboxSpec:
    return wire.SandboxSpec(
        ref=f"order:{n}",
        image=image,
        address=f"10.128.0.{n + 1}/32",
        peer_address=f"10.100.128.{n}/32",
        gpus=gpus,
        cpus=4000,
        memory_mb=16384,
        disk_gb=50,
        pids_limit=4096,
        egress=True,
        ssh_keys=(KEY,),
    )


@pytest.fixture
def parts(tmp_path: Path):
    engine = MemoryEngine(images={IMAGE})
    engine.ports[IMAGE] = (8888,)
    network = MemoryNetwork(engine)
    probe = Probe()
    cdi = UnprivilegedCdi()
    return engine, network, probe, cdi, tmp_path / "state"


def manager(parts, **extra) -> SandboxManager:
    engine, network, probe, cdi, state = parts
    return SandboxManager(
        engine, network, Inventory(), state, probe, cdi=cdi, check_interval=0, **extra
    )


def states(reports) -> dict[str, str]:
    return {report.ref: report.state for report in reports}


def test_a_new_sandbox_starts_with_its_gpus_limits_keys_and_network(parts):
    engine, network, probe, cdi, state = parts
    mgr = manager(parts)

    mgr.apply((sandbox(5),))
    mgr.wait_idle()

    [report] = mgr.reports(changed_only=True)
    assert report.state == "ready" and report.detail == ""
    assert report.gpus == (GPUS.gpus[1], GPUS.gpus[3])
    assert report.ports == (8888,)
    assert report.host_keys == sshd.read_host_keys(state / "molt-order-5")
    assert report.host_keys[0].startswith("ssh-ed25519 ")
    spec: ContainerSpec = engine.specs["molt-order-5"]
    assert spec.netns == "/var/run/netns/molt-order-5"
    assert spec.cdi_devices == ("nvidia.com/gpu=1", "nvidia.com/gpu=3")
    assert spec.env == {"NVIDIA_VISIBLE_DEVICES": f"{GPUS.gpus[1].uuid},{GPUS.gpus[3].uuid}"}
    assert (spec.cpus_milli, spec.memory_mb, spec.pids_limit) == (4000, 16384, 4096)
    assert spec.mounts == {str(state / "molt-order-5" / "ssh"): "/etc/molt"}
    assert spec.command[-1].endswith("exec /usr/sbin/sshd -D -e -f /etc/molt/sshd_config")
    assert (state / "molt-order-5" / "ssh" / "authorized_keys").read_text() == KEY + "\n"
    assert probe.hosts == ["10.128.0.6"]
    assert network.calls == [("setup", "order:5")]
    assert cdi.prepared == [GPUS.gpus]  # the spec covers the node's GPUs, not only the job's
    # Nothing changed since: the changed-only report is empty, the full one is not.
    assert mgr.reports(changed_only=True) == []
    assert states(mgr.reports(changed_only=False)) == {"order:5": "ready"}


def test_a_missing_image_is_pulled_first_with_progress(parts):
    engine, *_ = parts
    engine.images.clear()
    engine.pull_gate.clear()
    mgr = manager(parts)

    mgr.apply((sandbox(1),))
    for _ in range(200):
        pulling = [r for r in mgr.reports(changed_only=False) if r.state == "pulling"]
        if pulling:
            break
        threading.Event().wait(0.01)
    assert pulling and pulling[0].progress == 0
    engine.pull_gate.set()
    mgr.wait_idle()

    assert states(mgr.reports(changed_only=False)) == {"order:1": "ready"}
    assert IMAGE in engine.images


def test_a_sandbox_that_pulls_is_first_reported_pulling_never_starting_before_it(parts):
    # The gateway takes states forward only (pending, pulling, starting, ready): a "starting"
    # reported before the pull would have it ignore every "pulling" after it.
    engine, *_ = parts
    engine.images.clear()
    engine.pull_gate.clear()
    mgr = manager(parts)

    mgr.apply((sandbox(1),))
    seen: list[str] = []
    for _ in range(200):
        seen += [r.state for r in mgr.reports(changed_only=True)]
        if "pulling" in seen:
            break
        threading.Event().wait(0.01)
    assert seen and seen[0] == "pulling", seen
    engine.pull_gate.set()
    mgr.wait_idle()
    seen += [r.state for r in mgr.reports(changed_only=True)]
    assert seen[-1] == "ready" and "starting" not in seen[: seen.index("pulling")]


def test_a_failed_pull_fails_the_sandbox_with_the_reason_and_starts_nothing(parts):
    engine, network, *_ = parts
    other = "registry.example/none:1"
    engine.pull_fails[other] = f"pulling {other} failed: manifest unknown"
    mgr = manager(parts)

    mgr.apply((sandbox(2, image=other),))
    mgr.wait_idle()

    [report] = mgr.reports(changed_only=True)
    assert (report.state, report.detail) == ("failed", f"pulling {other} failed: manifest unknown")
    assert engine.started == [] and network.calls == []


def test_a_failed_start_fails_the_sandbox(parts):
    engine, *_ = parts
    engine.start_fails[IMAGE] = "podman run failed: no such device nvidia.com/gpu=1"
    mgr = manager(parts)

    mgr.apply((sandbox(3),))
    mgr.wait_idle()

    [report] = mgr.reports(changed_only=True)
    assert report.state == "failed"
    assert report.detail == "podman run failed: no such device nvidia.com/gpu=1"


def test_sshd_that_never_answers_fails_the_sandbox_and_frees_its_container(parts):
    engine, _network, probe, *_ = parts
    probe.failing.add("10.128.0.5")
    mgr = manager(parts)

    mgr.apply((sandbox(4),))
    mgr.wait_idle()

    [report] = mgr.reports(changed_only=True)
    assert report.state == "failed"
    assert report.detail == "sshd did not answer on 10.128.0.5:22 within 60 s"
    assert engine.containers() == []


def test_a_gpu_the_node_lacks_fails_the_sandbox_naming_it(parts):
    engine, *_ = parts
    mgr = manager(parts)

    mgr.apply((sandbox(6, gpus=(2, 7)),))
    mgr.wait_idle()

    [report] = mgr.reports(changed_only=True)
    assert (report.state, report.detail) == ("failed", "GPU 7 is not on this node")
    assert engine.started == []


def test_removal_takes_the_container_before_the_network_and_reports_stopped_once(parts):
    engine, network, _, _, state = parts
    mgr = manager(parts)
    mgr.apply((sandbox(1), sandbox(2, gpus=(0,))))
    mgr.wait_idle()
    mgr.reports(changed_only=True)

    mgr.apply((sandbox(2, gpus=(0,)),))

    assert engine.removed == ["molt-order-1"]
    assert network.containers_at_teardown["order:1"] == ["order:2"]
    assert not (state / "molt-order-1").exists()
    assert states(mgr.reports(changed_only=True)) == {"order:1": "stopped"}
    assert states(mgr.reports(changed_only=False)) == {"order:2": "ready"}


def test_removal_during_a_pull_starts_nothing_afterwards(parts):
    engine, network, *_ = parts
    engine.images.clear()
    engine.pull_gate.clear()
    mgr = manager(parts)
    mgr.apply((sandbox(1),))

    mgr.apply(())
    engine.pull_gate.set()
    mgr.wait_idle()

    assert engine.started == []
    assert ("setup", "order:1") not in network.calls
    assert states(mgr.reports(changed_only=True)) == {"order:1": "stopped"}


def test_after_an_agent_restart_running_sandboxes_are_adopted_and_orphans_removed(parts):
    engine, network, _probe, _cdi, _state = parts
    first = manager(parts)
    first.apply((sandbox(1), sandbox(2, gpus=(0,))))
    first.wait_idle()
    keys = {r.ref: r.host_keys for r in first.reports(changed_only=False)}
    started = list(engine.started)
    del first  # the agent process ends; its containers and namespaces stay

    network.refs.add("order:99")  # a namespace whose sandbox is no longer desired
    second = manager(parts)
    second.apply((sandbox(1),))
    second.wait_idle()

    reports = second.reports(changed_only=False)
    assert states(reports) == {"order:1": "ready"}
    [adopted] = [r for r in reports if r.ref == "order:1"]
    assert adopted.host_keys == keys["order:1"]
    assert adopted.gpus == (GPUS.gpus[1], GPUS.gpus[3])
    assert engine.started == started  # nothing restarted
    assert [c.ref for c in engine.containers()] == ["order:1"]  # order:2's was an orphan
    assert network.refs == {"order:1"}  # order:2's and order:99's namespaces went too
    assert ("teardown", "order:99") in network.calls


def test_a_sandbox_whose_container_died_is_reported_failed_not_restarted(parts):
    engine, *_ = parts
    mgr = manager(parts)
    mgr.apply((sandbox(1),))
    mgr.wait_idle()
    mgr.reports(changed_only=True)

    engine.kill("molt-order-1")

    [report] = mgr.reports(changed_only=True)
    assert (report.state, report.detail) == ("failed", "the container stopped (exit code 137)")
    assert engine.started == ["molt-order-1"]


def test_a_container_found_stopped_after_a_restart_is_reported_failed(parts):
    engine, _network, _probe, _cdi, _state = parts
    first = manager(parts)
    first.apply((sandbox(1),))
    first.wait_idle()
    engine.kill("molt-order-1")

    second = manager(parts)
    second.apply((sandbox(1),))

    assert states(second.reports(changed_only=True)) == {"order:1": "failed"}
    assert engine.started == ["molt-order-1"]


def test_every_change_is_signalled(parts):
    signals: list[int] = []
    mgr = manager(parts, on_change=lambda: signals.append(1))
    mgr.apply((sandbox(1),))
    mgr.wait_idle()
    assert len(signals) >= 3  # applied, starting, ready


def test_a_sandbox_begun_by_an_earlier_agent_whose_container_is_gone_is_failed_not_restarted(
    parts,
):
    engine, *_ = parts
    first = manager(parts)
    first.apply((sandbox(1), sandbox(2, gpus=())))
    first.wait_idle()
    engine.remove("molt-order-1")  # e.g. `podman rm -f` by hand while the agent was down

    second = manager(parts)
    second.apply((sandbox(1), sandbox(2, gpus=()), sandbox(3, gpus=())))
    second.wait_idle()

    got = {r.ref: (r.state, r.detail) for r in second.reports(changed_only=False)}
    assert got["order:1"][0] == "failed"
    assert got["order:1"][1].startswith("the sandbox's container is gone")
    assert got["order:2"] == ("ready", "")  # adopted
    assert got["order:3"] == ("ready", "")  # new: started
    # Started once each: order:1 by the first agent only, order:3 by the second.
    assert sorted(engine.started) == ["molt-order-1", "molt-order-2", "molt-order-3"]


def test_an_agent_that_cannot_list_containers_starts_nothing_until_it_can(parts):
    engine, *_ = parts
    first = manager(parts)
    first.apply((sandbox(1),))
    first.wait_idle()
    engine.listing_fails = "podman ps failed: database is locked"

    second = manager(parts)
    second.apply((sandbox(1), sandbox(2, gpus=())))
    assert second.reports(changed_only=False) == []  # nothing known, nothing touched

    engine.listing_fails = ""
    second.reports(changed_only=False)  # retries the deferred state
    second.wait_idle()

    assert states(second.reports(changed_only=False)) == {"order:1": "ready", "order:2": "ready"}
    assert engine.started == ["molt-order-1", "molt-order-2"]  # order:1 adopted, not restarted


def test_a_container_without_gpus_is_told_it_has_none_not_left_to_the_runtimes_default():
    # Unset, NVIDIA's runtime (and a CUDA image's own ENV, often "all") decides what a container
    # sees; "void" is the runtime's word for no GPU at all.
    assert CdiGpus.env(()) == {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert CdiGpus.env(GPUS.gpus[2:3]) == {"NVIDIA_VISIBLE_DEVICES": GPUS.gpus[2].uuid}
    assert CdiGpus.devices([3, 1, 3]) == ("nvidia.com/gpu=1", "nvidia.com/gpu=3")
