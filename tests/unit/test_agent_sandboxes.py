"""The daemon's side of job sandboxes, with a sandbox manager double implementing
engine.Sandboxes: the container goes before its peer, the firewall confines a peer to its
sandbox before the peer exists and until it is cut off, SANDBOX_STATUS is signed by the node and
sent in full after each (re)connect and apply, a stale revision changes nothing, and an agent
without a sandbox engine reports each sandbox failed. Signatures, reconcile and the in-memory
backend are the real ones (as in test_agent_daemon_view)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from clawnode import frames, wire
from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent, Timing
from clawnode.firewall import FakeFirewall, SandboxRule, sandbox_rules
from clawnode.gpu import SimulatedGpuReader
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair
from clawnode.sandbox.disabled import NoSandboxes
from clawnode.sandbox.network import host_veth
from clawnode.state import Enrollment, StateDir

from tests.unit.test_agent_daemon_view import GATEWAY, Connection, Frames

pytestmark = [pytest.mark.unit]

NODE = Identity.from_seed(bytes(range(32)))


def wg_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


class FakeSandboxes:
    """engine.Sandboxes double: every desired sandbox is "ready" at once, gone when no longer
    desired; each call is logged in `log` (shared with the backend's calls, to see the order)."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log
        self.running: dict[str, wire.SandboxReport] = {}
        self.changed: set[str] = set()
        self.applied: list[tuple[str, ...]] = []

    def apply(self, desired: tuple[wire.SandboxSpec, ...]) -> None:
        wanted = {box.ref for box in desired}
        self.applied.append(tuple(sorted(wanted)))
        for ref in sorted(set(self.running) - wanted):
            self.log.append(("remove_sandbox", ref))
            del self.running[ref]
            self.changed.discard(ref)
        for ref in sorted(wanted - set(self.running)):
            self.log.append(("start_sandbox", ref))
            self.running[ref] = wire.SandboxReport(ref=ref, state="ready", ports=(8888,))
            self.changed.add(ref)

    def reports(self, *, changed_only: bool) -> list[wire.SandboxReport]:
        refs = sorted(self.changed if changed_only else self.running)
        self.changed.clear()
        return [self.running[ref] for ref in refs]


class LoggingFirewall(FakeFirewall):
    def __init__(self, log: list[tuple[str, str]]) -> None:
        super().__init__()
        self.log = log

    def apply(self, interface: str, mesh_address: str, sandboxes: Any = ()) -> None:
        super().apply(interface, mesh_address, sandboxes)
        self.log.append(("firewall", ",".join(sorted(rule.peer_address for rule in sandboxes))))


def spec(ref: str, address: str, peer: str, egress: bool = True) -> wire.SandboxSpec:
    return wire.SandboxSpec(
        ref=ref, image="molt/base:1", address=address, peer_address=peer,
        gpus=(int(address.split(".")[3].split("/")[0]) % 64,),  # one GPU per address
        cpus=2000, memory_mb=4096, disk_gb=20, pids_limit=4096, egress=egress, ssh_keys=(),
    )  # fmt: skip


class Node:
    def __init__(
        self, state_dir: Path, sandboxes: bool = True, backend: FakeBackend | None = None
    ) -> None:
        self.backend = backend or FakeBackend()
        self.firewall = LoggingFirewall(self.backend.calls)
        self.sandboxes = FakeSandboxes(self.backend.calls) if sandboxes else None
        self.ws = Frames()
        self.revision = 0
        self.agent = Agent(
            state=StateDir(state_dir),
            enrollment=Enrollment(
                gateway="http://127.0.0.1:9",
                node_id=NODE.node_id,
                name="node-1",
                mesh_address="10.100.128.1",
                gateway_public_key=GATEWAY.public_key_b64,
                websocket_url="ws://127.0.0.1:9/ws/agent/",
                backend="userspace",
            ),
            identity=NODE,
            backend=self.backend,
            firewall=self.firewall,
            gpus=SimulatedGpuReader("RTX 4090:1"),
            sandboxes=self.sandboxes,
            images=("molt/base:1", "molt/jupyter:2"),
            timing=Timing(metering=3600),
            say=lambda line: None,
        )
        self.agent.bring_up()

    def restart(self) -> Node:
        """A new agent process on the same state directory and the same interface."""
        return Node(self.agent.state.path, self.sandboxes is not None, self.backend)

    def envelope(
        self, jobs: dict[str, tuple[str, wire.SandboxSpec | None]], revision: int | None = None
    ) -> dict[str, Any]:
        """Desired state {key: (peer address, its sandbox or None)}, signed by the gateway."""
        if revision is None:
            self.revision += 1
            revision = self.revision
        desired = wire.DesiredState(
            node_id=NODE.node_id,
            revision=revision,
            peers=tuple(
                wire.PeerSpec(key, (address,), "job", f"order:{i}")
                for i, (key, (address, _)) in enumerate(jobs.items())
            ),
            issued_at=int(time.time()),
            sandboxes=tuple(box for _, box in jobs.values() if box is not None),
        )
        return wire.signed_envelope(wire.DESIRED_STATE, desired.to_dict(), GATEWAY)

    def desire(self, jobs: Any, revision: int | None = None) -> None:
        asyncio.run(self.agent._apply_desired(self.ws, self.envelope(jobs, revision)))
        self.agent._removals_due.clear()
        asyncio.run(self.agent._finish_removals(self.ws))

    def statuses(self, ws: Frames | None = None) -> list[dict[str, Any]]:
        """Every SANDBOX_STATUS body sent, each checked against the node's key."""
        return [
            wire.open_envelope(frame["envelope"], NODE.public_key, wire.SANDBOX_STATUS)
            for frame in (ws or self.ws).of("sandbox_status")
        ]


def test_a_new_sandbox_is_fenced_in_before_its_peer_is_added(tmp_path):
    node = Node(tmp_path)
    key = wg_key()
    node.desire({key: ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})

    log = [entry for entry in node.backend.calls if entry[0] != "list_peers"]
    assert log.index(("start_sandbox", "order:0")) < log.index(("firewall", "10.64.200.7/32"))
    assert log.index(("firewall", "10.64.200.7/32")) < log.index(("set_peer", key))
    assert node.firewall.sandboxes[-1] == (
        SandboxRule(host_veth("order:0"), "10.128.0.33/32", "10.64.200.7/32", True),
    )


def test_a_stopped_job_loses_its_container_before_its_peer_and_its_pair_after(tmp_path):
    node = Node(tmp_path)
    stays, goes = wg_key(), wg_key()
    kept = ("10.64.200.8/32", spec("order:1", "10.128.0.34/32", "10.64.200.8/32", False))
    node.desire(
        {goes: ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32")),
         stays: kept}
    )  # fmt: skip
    del node.backend.calls[:]

    node.desire({stays: kept})

    log = [entry for entry in node.backend.calls if entry[0] != "list_peers"]
    removed = log.index(("remove_sandbox", "order:0"))
    cut_off = log.index(("set_peer", goes))  # retired: no allowed IPs any more
    assert removed < cut_off < log.index(("remove_peer", goes))
    # The table keeps confining the peer to its (gone) sandbox until the peer is cut off (the
    # old and new pairs together are what it already holds: no change), then drops the pair.
    walls = [i for i, entry in enumerate(log) if entry[0] == "firewall"]
    assert [log[i][1] for i in walls] == ["10.64.200.8/32"]
    assert cut_off < walls[0]


def test_each_apply_is_followed_by_a_full_signed_sandbox_status(tmp_path):
    node = Node(tmp_path)
    node.desire({wg_key(): ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})
    types = [frame["type"] for frame in node.ws.sent]
    assert types.index("ack") < types.index("sandbox_status")
    (status,) = node.statuses()
    assert status["full"] is True
    assert status["node_id"] == NODE.node_id
    assert [(box["ref"], box["state"]) for box in status["sandboxes"]] == [("order:0", "ready")]


def test_after_a_reconnect_the_full_report_follows_the_welcome(tmp_path):
    node = Node(tmp_path)
    key = wg_key()
    job = {key: ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))}
    node.desire(job)
    node.sandboxes.reports(changed_only=True)  # everything reported: nothing is "changed"

    ws = Connection([{"type": "welcome", "name": "node-1"}])
    asyncio.run(node.agent._session(ws, asyncio.Event()))

    types = [frame["type"] for frame in ws.sent]
    assert types[0] == "auth"
    assert types.index("inventory") < types.index("sandbox_status")
    (status,) = node.statuses(ws)
    assert status["full"] is True
    assert [box["ref"] for box in status["sandboxes"]] == ["order:0"]


def test_changed_only_reports_send_nothing_when_nothing_changed(tmp_path):
    node = Node(tmp_path)
    node.desire({wg_key(): ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})
    node.sandboxes.running["order:0"] = wire.SandboxReport(ref="order:0", state="failed")
    node.sandboxes.changed = {"order:0"}
    sent = len(node.ws.sent)

    asyncio.run(node.agent._send_sandbox_status(node.ws, full=False))
    asyncio.run(node.agent._send_sandbox_status(node.ws, full=False))

    assert len(node.ws.sent) == sent + 1  # the second found nothing changed
    status = node.statuses()[-1]
    assert status["full"] is False
    assert [(box["ref"], box["state"]) for box in status["sandboxes"]] == [("order:0", "failed")]


def test_a_stale_revision_with_other_sandboxes_changes_nothing(tmp_path):
    node = Node(tmp_path)
    key = wg_key()
    node.desire({key: ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})
    node.desire({key: ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})
    applied, walls = list(node.sandboxes.applied), list(node.firewall.applied)
    sent = node.ws.sent[:]
    calls = list(node.backend.calls)

    # An older revision (replayed or late) that would have dropped the sandbox and started
    # another one.
    other = wg_key()
    node.desire(
        {other: ("10.64.200.9/32", spec("order:5", "10.128.0.40/32", "10.64.200.9/32"))},
        revision=1,
    )

    assert node.sandboxes.applied == applied
    assert node.firewall.applied == walls
    assert node.ws.sent == sent
    assert [c for c in node.backend.calls if c[0] != "list_peers"] == [
        c for c in calls if c[0] != "list_peers"
    ]
    assert set(node.sandboxes.running) == {"order:0"}


def test_an_agent_without_a_sandbox_engine_reports_each_sandbox_failed(tmp_path):
    node = Node(tmp_path, sandboxes=False)
    assert isinstance(node.agent.sandboxes, NoSandboxes)
    node.desire({wg_key(): ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})
    (status,) = node.statuses()
    assert status["sandboxes"] == [
        {**status["sandboxes"][0], "ref": "order:0", "state": "failed",
         "detail": "this node runs no sandboxes"}
    ]  # fmt: skip
    # The peer is still confined: it owns a sandbox, even one that never ran.
    assert [rule.peer_address for rule in node.firewall.sandboxes[-1]] == ["10.64.200.7/32"]
    # Reported once as a change, then only in full reports.
    assert node.agent.sandboxes.reports(changed_only=True) == []
    assert [r.ref for r in node.agent.sandboxes.reports(changed_only=False)] == ["order:0"]


def test_no_sandboxes_forgets_those_no_longer_desired():
    none = NoSandboxes()
    none.apply((spec("order:0", "10.128.0.33/32", "10.64.200.7/32"),))
    none.apply(())
    assert none.reports(changed_only=False) == []
    assert none.reports(changed_only=True) == []


def test_the_inventory_names_the_images_this_node_offers(tmp_path):
    node = Node(tmp_path)
    asyncio.run(node.agent._send_inventory(node.ws))
    (inventory,) = node.ws.of("inventory")
    assert inventory["images"] == ["molt/base:1", "molt/jupyter:2"]
    assert inventory["gpus"][0]["name"] == "RTX 4090"


def test_sandbox_status_frame_is_signed_by_the_node():
    report = wire.SandboxReport(ref="order:3", state="pulling", progress=40)
    frame = frames.sandbox_status(NODE, [report], full=False)
    assert frame["type"] == "sandbox_status"
    body = wire.open_envelope(frame["envelope"], NODE.public_key, wire.SANDBOX_STATUS)
    status = wire.SandboxStatus.from_dict(body)
    assert status.sandboxes == (report,)
    assert status.full is False
    with pytest.raises(wire.BadSignature):
        wire.open_envelope(frame["envelope"], GATEWAY.public_key, wire.SANDBOX_STATUS)


def test_sandbox_rules_follow_the_desired_sandboxes():
    desired = wire.DesiredState(
        node_id=NODE.node_id, revision=1, peers=(), issued_at=int(time.time()),
        sandboxes=(spec("order:2", "10.128.0.35/32", "10.64.200.9/32", False),
                   spec("order:1", "10.128.0.34/32", "10.64.200.8/32", True)),
    )  # fmt: skip
    rules = sandbox_rules(desired)
    assert {(r.veth, r.address, r.peer_address, r.egress) for r in rules} == {
        (host_veth("order:2"), "10.128.0.35/32", "10.64.200.9/32", False),
        (host_veth("order:1"), "10.128.0.34/32", "10.64.200.8/32", True),
    }
    assert rules == tuple(sorted(rules))


def test_one_job_replacing_another_holds_both_pairs_while_the_peers_change(tmp_path):
    node = Node(tmp_path)
    old, new = wg_key(), wg_key()
    node.desire({old: ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})
    del node.backend.calls[:]

    node.desire({new: ("10.64.200.9/32", spec("order:1", "10.128.0.34/32", "10.64.200.9/32"))})

    log = [entry for entry in node.backend.calls if entry[0] != "list_peers"]
    both = log.index(("firewall", "10.64.200.7/32,10.64.200.9/32"))
    only_new = log.index(("firewall", "10.64.200.9/32"))
    assert log.index(("remove_sandbox", "order:0")) < both
    assert both < log.index(("set_peer", new)) < only_new
    assert both < log.index(("set_peer", old)) < only_new  # the old one cut off in between


def test_a_restarted_agent_confines_job_peers_from_its_first_table(tmp_path):
    node = Node(tmp_path)
    node.desire({wg_key(): ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})
    held = node.firewall.sandboxes[-1]

    again = node.restart()

    # The peer is still on the interface: before any desired state arrives, the table that
    # bring_up puts back keeps it in its sandbox (not the transitional mesh-address rule).
    assert again.firewall.sandboxes == [held]


def test_saved_sandbox_rules_the_table_would_refuse_are_ignored(tmp_path):
    node = Node(tmp_path)
    node.agent.state.write_sandbox_rules(
        [{"veth": "eth0", "address": "10.128.0.33/32", "peer_address": "10.64.200.7/32",
          "egress": True}]
    )  # fmt: skip
    said: list[str] = []
    node.agent.say = said.append
    assert node.agent._saved_sandbox_rules() is None
    assert "sandboxes[0].veth" in said[-1]
    node.agent.state.sandbox_rules_path.write_text("[1, 2]")
    assert node.agent._saved_sandbox_rules() is None


def test_a_node_with_no_sandboxes_says_nothing_of_them_to_a_gateway_that_may_not_know_them(
    tmp_path,
):
    node = Node(tmp_path, sandboxes=False)
    ws = Connection([{"type": "welcome", "name": "node-1"}])
    asyncio.run(node.agent._session(ws, asyncio.Event()))
    node.ws = ws
    node.desire({wg_key(): ("10.64.200.7/32", None)})  # a tunnel-only job, as before sandboxes

    assert ws.of("sandbox_status") == []
    assert [frame["type"] for frame in ws.sent if frame["type"] == "ack"] == ["ack"]


def test_a_sandbox_manager_that_fails_does_not_keep_peers_from_their_state(tmp_path):
    node = Node(tmp_path)

    def broken(desired):
        raise RuntimeError("podman is not installed")

    node.sandboxes.apply = broken
    said: list[str] = []
    node.agent.say = said.append
    key = wg_key()
    node.desire({key: ("10.64.200.7/32", spec("order:0", "10.128.0.33/32", "10.64.200.7/32"))})

    assert key in node.backend.peers
    assert any("podman is not installed" in line for line in said)
    # The peer is confined all the same.
    assert [rule.peer_address for rule in node.firewall.sandboxes[-1]] == ["10.64.200.7/32"]
