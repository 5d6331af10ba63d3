"""The daemon's reconcile step on the in-memory backend, one signed desired state at a time.

The agent plans each change against its own view of the interface instead of reading the whole
device; these tests pin what that must not cost: a device changed by hand is noticed and put
back, a refused change makes the agent read the device again, the last bytes of a removed peer
are billed, acks name every peer that changed or failed, and epochs only grow.

The websocket is a stand-in that keeps the frames the agent sends (what the gateway would get);
everything else is real: signatures, the reconcile, the epochs files. Every metering sample any
test here makes is checked, as it is sent, against epochs.json: an epoch reaches the gateway
only once it is durable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clawnode.journal
import clawnode.metering
import pytest
from clawnode import wire
from clawnode.backends.memory import FakeBackend
from clawnode.daemon import Agent, Timing
from clawnode.firewall import FakeFirewall
from clawnode.gpu import SimulatedGpuReader
from clawnode.keys import Identity, encode_key, generate_wireguard_keypair
from clawnode.state import Enrollment, StateDir

from meshnet import metering

pytestmark = [pytest.mark.unit]

GATEWAY = Identity.from_seed(bytes(range(100, 132)))


def wg_key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


class Frames:
    """Stand-in for the agent's websocket: keeps every frame the agent sends, parsed."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.on_send: Callable[[dict[str, Any]], None] = lambda frame: None

    async def send(self, text: str) -> None:
        frame = json.loads(text)
        self.on_send(frame)
        self.sent.append(frame)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.sent if frame["type"] == kind]

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        return [frame["envelope"]["body"] for frame in self.of(kind)]


class Connection(Frames):
    """Stand-in for a new gateway connection: a challenge, then `frames`, then closed."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        super().__init__()
        self.frames = frames

    async def recv(self) -> str:
        return json.dumps({"type": "challenge", "challenge": "c" * 43})

    async def __aiter__(self) -> Any:
        for frame in self.frames:
            yield json.dumps(frame)


class Node:
    """An agent on a FakeBackend, fed signed desired states as the gateway would send them."""

    def __init__(self, state_dir: Path, backend: FakeBackend | None = None) -> None:
        self.identity = Identity.from_seed(bytes(range(32)))
        self.backend = backend or FakeBackend()
        self.state_dir = state_dir
        self.ws = Frames()
        self.ws.on_send = self.check_epochs_durable
        self.revision = 0
        self.agent = self._agent(state_dir)
        if not self.backend.exists:
            self.agent.bring_up()

    def _agent(self, state_dir: Path) -> Agent:
        state = StateDir(state_dir)
        enrollment = Enrollment(
            gateway="http://127.0.0.1:9",
            node_id=self.identity.node_id,
            name="node-1",
            mesh_address="10.100.128.1",
            gateway_public_key=GATEWAY.public_key_b64,
            websocket_url="ws://127.0.0.1:9/ws/agent/",
            backend="userspace",
        )
        return Agent(
            state=state,
            enrollment=enrollment,
            identity=self.identity,
            backend=self.backend,
            firewall=FakeFirewall(),
            gpus=SimulatedGpuReader("RTX 4090:1"),
            timing=Timing(metering=0.01),
            say=lambda line: None,
        )

    def envelope(
        self, peers: dict[str, str], endpoints: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Desired state {key: allowed network} at the next revision, signed by the gateway;
        a peer in `endpoints` is named there with that endpoint and keepalive 25."""
        self.revision += 1
        endpoints = endpoints or {}
        desired = wire.DesiredState(
            node_id=self.identity.node_id,
            revision=self.revision,
            peers=tuple(
                wire.PeerSpec(
                    key,
                    (network,),
                    "job",
                    f"order-{i}",
                    endpoint=endpoints.get(key, ""),
                    persistent_keepalive=25 if key in endpoints else 0,
                )
                for i, (key, network) in enumerate(peers.items())
            ),
            issued_at=int(time.time()),
        )
        return wire.signed_envelope(wire.DESIRED_STATE, desired.to_dict(), GATEWAY)

    def desire(
        self, peers: dict[str, str], endpoints: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Send a desired state on the current connection; return the agent's ack. Peers it
        retired are then removed, as the session's removals task would (finish_removals)."""
        acks = len(self.ws.of("ack"))
        asyncio.run(self.agent._apply_desired(self.ws, self.envelope(peers, endpoints)))
        assert len(self.ws.of("ack")) == acks + 1, self.ws.sent[-1]
        ack = self.ws.bodies("ack")[-1]
        self.finish_removals()
        return ack

    def finish_removals(self) -> None:
        """What the removals task does when woken (a session's task may have been cancelled
        with the session before it finished)."""
        self.agent._removals_due.clear()
        asyncio.run(self.agent._finish_removals(self.ws))

    def reconnect(
        self, peers: dict[str, str], endpoints: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A new connection: challenge, the agent's auth, the full desired state, closed."""
        envelope = self.envelope(peers, endpoints)
        self.ws = Connection([{"type": "desired_state", "envelope": envelope}])
        self.ws.on_send = self.check_epochs_durable
        asyncio.run(self.agent._session(self.ws, asyncio.Event()))
        assert [frame["type"] for frame in self.ws.sent[:1]] == ["auth"]
        return self.ws.bodies("ack")[-1]

    def sample(self) -> None:
        """One whole turn of the metering loop (the 10 s sample and what follows it)."""

        async def one_turn() -> None:
            task = asyncio.ensure_future(self.agent._metering(self.ws))
            # The second sample is taken after the first turn has finished.
            samples = len(self.ws.of("metering"))
            while len(self.ws.of("metering")) < samples + 2 and not task.done():
                await asyncio.sleep(0.005)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(one_turn())

    def check_epochs_durable(self, frame: dict[str, Any]) -> None:
        """At the moment a sample is sent: each epoch it carries is in epochs.json (fsynced),
        and below the next epoch saved there, so no restart can hand it out again."""
        if frame["type"] != "metering":
            return
        saved = json.loads((self.state_dir / "epochs.json").read_text())
        for peer in frame["envelope"]["body"]["peers"]:
            if peer["epoch"] == 0:
                continue  # a peer the agent never added (one added by hand)
            assert peer["epoch"] < saved["next_epoch"]
            if peer["public_key"] not in self.agent.journal.epochs:
                continue  # the final counters of a removed peer, sent again after a reconnect
            assert saved["peers"].get(peer["public_key"]) == peer["epoch"], (peer, saved)

    def reads(self) -> int:
        return sum(1 for op, _ in self.backend.calls if op == "list_peers")


def results(ack: dict[str, Any]) -> dict[str, bool]:
    return {r["public_key"]: r["ok"] for r in ack["results"]}


def test_bring_up_routes_the_job_block_onto_the_interface(tmp_path):
    # Job addresses (10.64.0.0/11) are not on-link with the node's 10.100.128.1/17: without the
    # route a sandbox's replies to its buyer would leave by the default route, not the tunnel.
    # An enrolment saved before gateways answered the whole mesh (the MOLT /17) also routes the
    # whole mesh (10.100.0.0/16): the hub's 10.100.0.1 and nodes of the region blocks are off
    # its on-link /17.
    node = Node(tmp_path)

    assert node.backend.address == "10.100.128.1/17"
    assert node.backend.routes == ("10.64.0.0/11", "10.128.0.0/11", "10.100.0.0/16")
    ack = node.desire({(key := wg_key()): "10.64.0.9/32"})
    assert results(ack) == {key: True}
    assert node.backend.peers[key].allowed_ips == ("10.64.0.9/32",)


def test_one_change_is_planned_from_the_agents_view_without_reading_the_device(tmp_path):
    node = Node(tmp_path)
    a, b, c = wg_key(), wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    assert node.reads() == 1  # the first state after connecting reads the device

    ack = node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32", c: "10.64.0.11/32"})

    assert node.reads() == 1
    assert c in node.backend.peers
    # Only what this revision changed is acknowledged; peers already right are not listed.
    assert results(ack) == {c: True}


def test_a_reconnect_reads_the_device_again(tmp_path):
    node = Node(tmp_path)
    a = wg_key()
    node.desire({a: "10.64.0.9/32"})
    del node.backend.peers[a]  # gone while the agent was disconnected

    ack = node.reconnect({a: "10.64.0.9/32"})

    assert node.reads() == 2
    assert results(ack) == {a: True}
    assert a in node.backend.peers


def test_a_removed_peer_is_cut_off_then_its_last_bytes_are_sent_before_it_goes(tmp_path):
    node = Node(tmp_path)
    stays, goes = wg_key(), wg_key()
    node.desire({stays: "10.64.0.9/32", goes: "10.64.0.10/32"})
    node.backend.add_traffic(stays, rx=1, tx=2)
    node.backend.add_traffic(goes, rx=3_000, tx=4_000)  # after the last periodic sample
    sent = len(node.ws.sent)

    asyncio.run(node.agent._apply_desired(node.ws, node.envelope({stays: "10.64.0.9/32"})))

    # Cut off at once (no allowed IPs, no keepalive), still on the interface with its counters;
    # the ack says so, and nothing is read for it yet.
    assert node.backend.peers[goes].allowed_ips == ()
    assert node.backend.peers[goes].persistent_keepalive == 0
    assert [frame["type"] for frame in node.ws.sent[sent:]] == ["ack"]
    ack = node.ws.bodies("ack")[-1]
    assert results(ack) == {goes: True}
    assert ack["removing"] == [goes]
    assert node.agent._removals_due.is_set()

    node.finish_removals()

    assert goes not in node.backend.peers and stays in node.backend.peers
    assert [frame["type"] for frame in node.ws.sent[sent:]] == ["ack", "metering", "removed"]
    sample = node.ws.bodies("metering")[-1]
    assert [(p["public_key"], p["rx_bytes"], p["tx_bytes"]) for p in sample["peers"]] == [
        (goes, 3_000, 4_000)
    ]
    assert node.ws.bodies("removed")[-1]["public_keys"] == [goes]
    ops = [call for call in node.backend.calls if call[1] == goes]
    assert ops[-3:] == [("set_peer", goes), ("read_peers", goes), ("remove_peer", goes)]


def test_a_retired_peer_desired_again_before_its_removal_is_kept(tmp_path):
    node = Node(tmp_path)
    a = wg_key()
    node.desire({a: "10.64.0.9/32"})
    asyncio.run(node.agent._apply_desired(node.ws, node.envelope({})))
    assert node.backend.peers[a].allowed_ips == ()

    ack = node.desire({a: "10.64.0.9/32"})  # and the removals task runs after it

    assert results(ack) == {a: True} and ack["removing"] == []
    assert node.backend.peers[a].allowed_ips == ("10.64.0.9/32",)
    assert node.ws.of("removed") == []


def test_a_peer_still_leaving_is_named_removing_in_the_next_revisions_ack_too(tmp_path):
    # Retired by one revision, not yet removed when the next arrives: that revision has no
    # action (and so no result) for it, and its ack must still say it is leaving.
    node = Node(tmp_path)
    a, b, c = wg_key(), wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    asyncio.run(node.agent._apply_desired(node.ws, node.envelope({a: "10.64.0.9/32"})))
    assert node.ws.bodies("ack")[-1]["removing"] == [b]

    peers = {a: "10.64.0.9/32", c: "10.64.0.11/32"}
    asyncio.run(node.agent._apply_desired(node.ws, node.envelope(peers)))

    ack = node.ws.bodies("ack")[-1]
    assert results(ack) == {c: True} and ack["removing"] == [b]


def test_a_retired_peer_found_after_a_restart_is_named_removing_and_removed(tmp_path):
    # The agent stopped between cutting a peer off and removing it: the interface keeps the
    # retired peer; the next session's ack names it, then it is read and removed.
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    node.backend.set_peer(b, [], keepalive=0)  # retired, not removed
    node.backend.add_traffic(b, rx=5, tx=6)

    ack = node.reconnect({a: "10.64.0.9/32"})

    assert results(ack) == {} and ack["removing"] == [b]
    node.finish_removals()
    assert set(node.backend.peers) == {a}
    assert node.ws.bodies("removed")[-1]["public_keys"] == [b]
    assert (b, 5, 6) in [
        (p["public_key"], p["rx_bytes"], p["tx_bytes"])
        for p in node.ws.bodies("metering")[-1]["peers"]
    ]


def test_a_refused_removal_is_reported_and_the_device_read_again_and_the_next_state_retries(
    tmp_path,
):
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    node.backend.refuse[b] = "device busy"
    reads = node.reads()

    ack = node.desire({a: "10.64.0.9/32"})

    assert results(ack) == {b: False} and ack["removing"] == []
    assert "device busy" in ack["results"][0]["detail"]
    assert node.reads() == reads + 1  # after a refusal the view is not trusted: read again
    del node.backend.refuse[b]
    ack = node.desire({a: "10.64.0.9/32"})
    assert results(ack) == {b: True} and ack["removing"] == [b]
    assert b not in node.backend.peers
    assert node.ws.bodies("removed")[-1]["public_keys"] == [b]


def test_a_peer_removed_by_hand_is_noticed_at_the_next_sample_and_put_back(tmp_path):
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    node.backend.remove_peer(a)  # someone ran `wg set molt0 peer A remove`
    node.backend.set_peer(b, ["10.64.0.99/32"])  # and changed B's allowed IPs

    node.sample()

    assert node.backend.peers[a].allowed_ips == ("10.64.0.9/32",)
    assert node.backend.peers[b].allowed_ips == ("10.64.0.10/32",)
    reports = [frame["detail"] for frame in node.ws.of("report")]
    assert len(reports) == 1 and "drifted from revision 1" in reports[0]
    # Put back, the peer starts from zero: it gets a new epoch, sent with its counters.
    node.sample()
    counters = {p["public_key"]: p for p in node.ws.bodies("metering")[-1]["peers"]}
    assert counters[a]["epoch"] > counters[b]["epoch"]
    assert len(node.ws.of("report")) == 1  # nothing drifted since: nothing more to say


def test_a_peer_added_by_hand_is_removed_at_the_next_sample(tmp_path):
    node = Node(tmp_path)
    a, stranger = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32"})
    node.backend.set_peer(stranger, ["10.64.0.50/32"])

    node.sample()

    assert set(node.backend.peers) == {a}


def test_a_desired_state_planned_before_the_sample_is_fixed_by_the_sample(tmp_path):
    # The view is up to one sample old: a change made by hand in between is not seen by the
    # next desired state, but the sample after it sees it and restores the newest state.
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32"})
    node.backend.remove_peer(a)

    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    node.sample()

    assert set(node.backend.peers) == {a, b}


def test_a_roamed_endpoint_alone_is_not_reset_by_the_sample(tmp_path):
    node = Node(tmp_path)
    a = wg_key()
    node.desire({a: "10.64.0.9/32"})
    node.backend.set_peer(a, ["10.64.0.9/32"], endpoint="203.0.113.5:40000")  # roamed
    changes = len([call for call in node.backend.calls if call[0] == "set_peer"])

    node.sample()

    assert len([call for call in node.backend.calls if call[0] == "set_peer"]) == changes
    assert node.ws.of("report") == []


RELAY = "192.0.2.40:52001"  # the relay's provider port for the pair
BUYER = "198.51.100.7:40000"  # the buyer's mapping, as the hub saw it
ELSEWHERE = "203.0.113.9:45000"  # where WireGuard roamed a peer on its own


def endpoints(node: Node) -> dict[str, str]:
    return {key: peer.endpoint for key, peer in node.backend.peers.items()}


def test_a_live_relayed_peer_follows_the_gateway_to_the_buyer_and_back(tmp_path):
    # docs/nat.md, "Upgrading a relayed path": both tunnels are live (a handshake a second
    # ago). a's endpoint is the one the agent was told, so each new choice of the gateway's is
    # applied: the upgrade's start, then its give-up, after a reconnect too. b's was roamed by
    # WireGuard (the buyer's packets came from elsewhere): it stays.
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    peers = {a: "10.64.0.9/32", b: "10.64.0.10/32"}
    node.desire(peers, {a: RELAY, b: RELAY})
    node.backend.set_peer(b, ["10.64.0.10/32"], endpoint=ELSEWHERE, keepalive=25)  # roamed
    for key in peers:
        node.backend.add_traffic(key, 100, 100, handshake_at=int(time.time()) - 1)

    assert results(node.desire(peers, {a: BUYER, b: BUYER})) == {a: True}
    assert endpoints(node) == {a: BUYER, b: ELSEWHERE}

    assert results(node.reconnect(peers, {a: RELAY, b: RELAY})) == {a: True}
    assert endpoints(node) == {a: RELAY, b: ELSEWHERE}


def test_a_restarted_agent_moves_a_live_endpoint_only_once_it_named_it_itself(tmp_path):
    # After a restart the agent cannot tell the relay it was told from an endpoint WireGuard
    # roamed to: the upgrade's state leaves the peer on the relay (the gateway gives it up).
    node = Node(tmp_path)
    a = wg_key()
    peers = {a: "10.64.0.9/32"}
    node.desire(peers, {a: RELAY})
    node.backend.add_traffic(a, 100, 100, handshake_at=int(time.time()) - 1)
    restarted = Node(tmp_path, backend=node.backend)
    restarted.revision = node.revision

    restarted.desire(peers, {a: BUYER})
    assert endpoints(restarted) == {a: RELAY}

    # The give-up names the relay again; a later upgrade then moves the peer.
    restarted.desire(peers, {a: RELAY})
    restarted.desire(peers, {a: BUYER})
    assert endpoints(restarted) == {a: BUYER}


def test_epochs_only_grow_and_removed_peers_are_forgotten(tmp_path):
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    first = dict(node.agent.journal.epochs)

    node.desire({b: "10.64.0.10/32"})
    assert a not in node.agent.journal.epochs  # removed, not desired: pruned
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})

    assert node.agent.journal.epochs[a] > max(first.values())  # re-added: higher than any before
    assert node.agent.journal.epochs[b] == first[b]
    # A restarted agent goes on from the saved counter and the journal, so pruning never
    # reuses an epoch.
    restarted = Node(tmp_path, backend=node.backend)
    assert restarted.agent.journal.epochs == node.agent.journal.epochs
    assert restarted.agent.journal.next_epoch == node.agent.journal.next_epoch
    restarted.revision = node.revision
    restarted.desire({b: "10.64.0.10/32"})
    restarted.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    assert restarted.agent.journal.epochs[a] > node.agent.journal.epochs[a]


def test_a_peer_whose_removal_failed_keeps_its_epoch(tmp_path):
    node = Node(tmp_path)
    a = wg_key()
    node.desire({a: "10.64.0.9/32"})
    epoch = node.agent.journal.epochs[a]
    node.backend.refuse[a] = "device busy"

    node.desire({})

    assert node.agent.journal.epochs[a] == epoch  # still on the interface, still metered


def test_epochs_saved_in_the_first_format_are_read(tmp_path):
    a, b = wg_key(), wg_key()
    (tmp_path / "epochs.json").write_text(json.dumps({a: 3, b: 7}))

    node = Node(tmp_path)
    node.desire({wg_key(): "10.64.0.20/32"})

    # pruned: not there
    assert a not in node.agent.journal.epochs and b not in node.agent.journal.epochs
    assert node.agent.journal.next_epoch == 9  # above every epoch ever handed out


# -- epochs: no fsync to add a peer, durable before a sample carries them -------------------------


class Gateway:
    """What the gateway bills from the samples, per key, by meshnet.metering's rule."""

    def __init__(self) -> None:
        self.base: dict[str, metering.Counters] = {}
        self.billed: Counter[str] = Counter()
        self.seen: set[tuple[str, int]] = set()

    def take(self, frames: Frames) -> None:
        for body in frames.bodies("metering"):
            if (body["boot_id"], body["seq"]) in self.seen:
                continue
            self.seen.add((body["boot_id"], body["seq"]))
            for peer in body["peers"]:
                key = peer["public_key"]
                current = metering.Counters(peer["epoch"], peer["rx_bytes"], peer["tx_bytes"])
                previous = self.base.get(key)
                if previous is not None and current.epoch < previous.epoch:
                    continue
                rx, tx = metering.delta(previous, current)
                self.base[key] = current
                self.billed[key] += rx + tx


def epochs_json_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths the epoch journal writes with write_private_atomically (fsync), in order."""
    written: list[Path] = []
    real = clawnode.journal.write_private_atomically

    def spy(path: Path, data: bytes) -> None:
        written.append(path)
        real(path, data)

    monkeypatch.setattr(clawnode.journal, "write_private_atomically", spy)
    return written


def test_adding_a_peer_journals_its_epoch_and_the_next_sample_saves_it_first(tmp_path, monkeypatch):
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32"})
    node.sample()
    written = epochs_json_writes(monkeypatch)

    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})

    assert written == []  # no fsync on the way to the ack
    epoch = node.agent.journal.epochs[b]
    assert (tmp_path / "epochs.journal").read_text() == f"{b} {epoch}\n"
    assert b not in json.loads((tmp_path / "epochs.json").read_text())["peers"]

    node.sample()  # check_epochs_durable: saved before the sample went

    assert written[:1] == [tmp_path / "epochs.json"]
    sent = {p["public_key"]: p["epoch"] for p in node.ws.bodies("metering")[-1]["peers"]}
    assert sent[b] == epoch
    assert (tmp_path / "epochs.journal").read_bytes() == b""  # covered by epochs.json now


def test_a_peer_removed_before_any_sample_has_its_epoch_saved_before_its_last_bytes_go(
    tmp_path, monkeypatch
):
    node = Node(tmp_path)
    a = wg_key()
    node.desire({a: "10.64.0.9/32"})
    node.backend.add_traffic(a, rx=10, tx=20)
    written = epochs_json_writes(monkeypatch)

    node.desire({})

    assert written == [tmp_path / "epochs.json"]  # check_epochs_durable saw it there in time
    last = node.ws.bodies("metering")[-1]["peers"]
    assert [(p["public_key"], p["rx_bytes"], p["tx_bytes"]) for p in last] == [(a, 10, 20)]


def test_a_removal_of_a_peer_already_sampled_writes_no_epochs(tmp_path, monkeypatch):
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    node.sample()
    written = epochs_json_writes(monkeypatch)

    node.desire({b: "10.64.0.10/32"})

    assert written == []
    assert node.ws.bodies("metering")[-1]["peers"][0]["public_key"] == a


def test_an_agent_that_died_before_saving_an_epoch_bills_the_peer_once_after_restart(tmp_path):
    # A key sampled under one epoch, removed, added again (its counters start at zero under a
    # new epoch, in the journal only: epochs.json still has the old one), then the agent dies.
    # The interface keeps the peer and its counters. The restarted agent must report the new
    # epoch: with the old one the gateway would take the new counters for growth of the old
    # and miss what the peer had before its removal.
    gateway = Gateway()
    node = Node(tmp_path)
    k, other = wg_key(), wg_key()
    both = {k: "10.64.0.9/32", other: "10.64.0.10/32"}
    node.desire(both)
    node.backend.add_traffic(k, rx=100, tx=200)
    node.sample()
    node.backend.add_traffic(k, rx=50, tx=50)
    node.desire({other: "10.64.0.10/32"})  # k's last bytes (150, 250) go first
    gateway.take(node.ws)
    node.desire(both)
    added_with = node.agent.journal.epochs[k]
    node.backend.add_traffic(k, rx=1_000, tx=2_000)  # more than before its removal
    assert json.loads((tmp_path / "epochs.json").read_text())["peers"][k] < added_with

    restarted = Node(tmp_path, backend=node.backend)  # nothing saved on the way down
    restarted.revision = node.revision
    assert restarted.agent.journal.epochs[k] == added_with
    restarted.reconnect(both)
    restarted.sample()  # check_epochs_durable: the journaled epoch is saved before it goes
    gateway.take(restarted.ws)
    restarted.backend.add_traffic(k, rx=1, tx=1)
    restarted.sample()
    gateway.take(restarted.ws)

    assert gateway.billed[k] == (150 + 250) + (1_001 + 2_001)
    # And epochs handed out after the restart are above every one before it.
    restarted.desire({other: "10.64.0.10/32"})
    restarted.desire(both)
    assert restarted.agent.journal.epochs[k] > added_with


def test_the_journal_is_read_after_epochs_json_and_stops_at_a_line_cut_short(tmp_path):
    a, b, c, d = wg_key(), wg_key(), wg_key(), wg_key()
    (tmp_path / "epochs.json").write_text(json.dumps({"next_epoch": 5, "peers": {a: 3}}))
    (tmp_path / "epochs.journal").write_text(
        f"{a} 2\n"  # older than epochs.json (the journal was not emptied): already in it
        f"{b} 5\n{a} 6\n"  # handed out after it: these count, the later line for a wins
        "\x00\x00\x00\n"  # what a power cut can leave
        f"{c} 7\n"  # nothing after a bad line is trusted
        f"{d} 8"  # and a last line without its newline was cut short
    )

    agent = Node(tmp_path).agent

    assert agent.journal.epochs == {a: 6, b: 5}
    assert agent.journal.next_epoch == 7
    # 5 and 6 are not durable yet: the next sample saves them
    assert agent.journal.durable_epoch == 5


class JournalWitness(FakeBackend):
    """A device that, when asked to add a peer, notes whether its epoch was already journaled."""

    def __init__(self, journal: Path) -> None:
        super().__init__()
        self.journal = journal
        self.journaled_when_added: dict[str, bool] = {}

    def set_peer(self, public_key: str, *args: Any, **kwargs: Any) -> None:
        if public_key not in self.peers:
            text = self.journal.read_text() if self.journal.exists() else ""
            self.journaled_when_added[public_key] = f"{public_key} " in text
        super().set_peer(public_key, *args, **kwargs)


def test_an_epoch_is_journaled_before_the_device_has_the_peer(tmp_path):
    # Journaled after the add, a crash between the two would leave a live peer with no epoch.
    backend = JournalWitness(tmp_path / "epochs.journal")
    node = Node(tmp_path, backend=backend)
    a, b = wg_key(), wg_key()

    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})

    assert backend.journaled_when_added == {a: True, b: True}


def test_a_removed_peers_final_counters_are_sent_again_first_thing_after_a_reconnect(
    tmp_path, monkeypatch
):
    # The connection may die with the final sample still in a buffer, and nothing else will
    # carry those bytes (the peer is gone): the next session sends them again before its ack
    # can close the key. The gateway counts a repeat as nothing new.
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32", b: "10.64.0.10/32"})
    node.backend.add_traffic(b, rx=700, tx=800)
    node.desire({a: "10.64.0.9/32"})
    final = next(p for p in node.ws.bodies("metering")[-1]["peers"] if p["public_key"] == b)
    assert b not in node.backend.peers and b not in node.agent.journal.epochs

    def session() -> list[dict[str, Any]]:
        node.ws = Connection(
            [
                {"type": "welcome", "name": "node-1"},
                {"type": "desired_state", "envelope": node.envelope({a: "10.64.0.9/32"})},
            ]
        )
        node.ws.on_send = node.check_epochs_durable
        asyncio.run(node.agent._session(node.ws, asyncio.Event()))
        return node.ws.sent

    sent = session()

    kinds = [frame["type"] for frame in sent]
    assert kinds.index("metering") < kinds.index("ack")
    assert node.ws.bodies("metering")[0]["peers"] == [final]
    assert final["rx_bytes"] == 700 and final["tx_bytes"] == 800

    # Past the window (a dead connection is noticed well within it) they are not sent again.
    monkeypatch.setattr(clawnode.metering, "RESEND_FINALS_SECONDS", 0.0)
    session()
    assert all(p["public_key"] != b for body in node.ws.bodies("metering") for p in body["peers"])


def test_a_removal_the_device_refuses_is_retried_by_the_next_sample(tmp_path):
    node = Node(tmp_path)
    a = wg_key()
    node.desire({a: "10.64.0.9/32"})
    asyncio.run(node.agent._apply_desired(node.ws, node.envelope({})))  # cut off
    node.backend.refuse[a] = "device busy"

    node.finish_removals()

    assert a in node.backend.peers  # still there, cut off, counters kept
    assert node.ws.of("removed") == []
    del node.backend.refuse[a]
    node.backend.add_traffic(a, rx=11, tx=22)
    node.sample()
    assert a not in node.backend.peers
    assert node.ws.bodies("removed")[-1]["public_keys"] == [a]
    # The sample that removed it carried its final counters.
    finals = [
        p for body in node.ws.bodies("metering") for p in body["peers"] if p["public_key"] == a
    ]
    assert (finals[-1]["rx_bytes"], finals[-1]["tx_bytes"]) == (11, 22)


# -- what the agent refuses to apply --------------------------------------------------------------


def changes(node: Node) -> list[tuple[str, str]]:
    """What the agent asked of the device: every call but reads."""
    return [call for call in node.backend.calls if call[0] not in ("list_peers", "read_peers")]


def test_an_older_revision_correctly_signed_is_ignored_even_after_a_restart(tmp_path):
    # A state delayed on the bus (or replayed) must not undo a newer one: the peer it adds was
    # taken off since, and adding it back would let a stopped buyer in again.
    node = Node(tmp_path)
    a, b = wg_key(), wg_key()
    older = node.envelope({a: "10.64.0.9/32", b: "10.64.0.10/32"})  # revision 1
    node.desire({a: "10.64.0.9/32"})  # revision 2, applied
    before = (len(changes(node)), len(node.ws.sent))

    asyncio.run(node.agent._apply_desired(node.ws, older))

    assert set(node.backend.peers) == {a}
    assert (len(changes(node)), len(node.ws.sent)) == before  # nothing applied, nothing acked
    assert node.agent.applied_revision == 2
    # The applied revision survives a restart (status.json): the replay is ignored there too.
    restarted = Node(tmp_path, backend=node.backend)
    assert restarted.agent.applied_revision == 2
    asyncio.run(restarted.agent._apply_desired(restarted.ws, older))
    assert set(restarted.backend.peers) == {a}
    assert restarted.ws.sent == []


def tampered(envelope: dict[str, Any], peer: str) -> dict[str, Any]:
    """`envelope` with a peer added to its body after signing."""
    body = json.loads(json.dumps(envelope["body"]))
    body["peers"].append(
        {"public_key": peer, "allowed_ips": ["10.64.0.66/32"], "kind": "job", "ref": "evil"}
    )
    return {**envelope, "body": body}


@pytest.mark.parametrize("forgery", ["another key", "body changed after signing"])
def test_a_desired_state_without_the_gateways_signature_is_refused_and_nothing_applied(
    tmp_path, forgery
):
    # A compromised bus (or anyone who can reach the agent's websocket) must not add peers.
    node = Node(tmp_path)
    a, intruder = wg_key(), wg_key()
    node.desire({a: "10.64.0.9/32"})
    before = (len(changes(node)), len(node.ws.of("ack")))
    if forgery == "another key":
        node.revision += 1
        desired = wire.DesiredState(
            node_id=node.identity.node_id,
            revision=node.revision,
            peers=(
                wire.PeerSpec(a, ("10.64.0.9/32",), "job", "order-0"),
                wire.PeerSpec(intruder, ("10.64.0.66/32",), "job", "evil"),
            ),
            issued_at=int(time.time()),
        )
        envelope = wire.signed_envelope(wire.DESIRED_STATE, desired.to_dict(), Identity.generate())
    else:
        envelope = tampered(node.envelope({a: "10.64.0.9/32"}), intruder)

    asyncio.run(node.agent._apply_desired(node.ws, envelope))

    assert set(node.backend.peers) == {a}
    assert (len(changes(node)), len(node.ws.of("ack"))) == before
    assert node.agent.applied_revision == 1
    reports = [frame["detail"] for frame in node.ws.of("report")]
    assert len(reports) == 1 and reports[0].startswith("refused desired state:"), reports
    assert "signature" in reports[0]
