"""`clawnode run`: the agent daemon.

One loop per gateway connection: challenge-response auth, then four things at once:
- desired state from the gateway: verified against the gateway key pinned at enrolment,
  reconciled peer by peer (reconcile.plan, then apply), acknowledged with per-peer results;
  a peer no longer desired is cut off there and named "removing" in the ack;
- removals: the final counters of the peers cut off, read without holding up other changes,
  sent in a signed sample, then the peers removed and reported "removed" (clawnode.retirement);
- job sandboxes (clawnode.sandbox): each applied desired state's sandboxes go to the sandbox
  manager first, so a container leaves before its peer; the firewall takes the (peer,
  sandbox) pairs before a peer is added and keeps them until it is cut off; signed
  SANDBOX_STATUS reports, in full after each (re)connect and each apply, else what changed;
- heartbeats (and the GPU inventory, with the images this node offers, now and then);
- signed metering samples of every peer's cumulative counters with their epoch.
- a node-to-node peer this node sends to second gets its endpoint a moment after the other side
  starts (clawnode.send_order: two initiations that cross can leave the tunnel dead for 2 min).
What it sends is built in clawnode.frames and clawnode.metering; the epochs are kept by
clawnode.journal; `clawnode run` as a process (backend, signals, exit status) is
clawnode.service.
The agent plans against its own view of the interface's peers (the last full read, updated by
each change it applies), not a fresh read of the whole device per change, which cost most of a
change at a thousand peers. The view is replaced by a full read on every (re)connect, after any
change the device refused, and at every metering sample; a sample that finds the device drifted
from the last applied desired state (someone ran `wg set` by hand) restores that state.
A lost connection is retried with exponential backoff and jitter (clawnode.reconnect); on
reconnect the gateway sends the full state again, so nothing depends on a message that was lost.
SIGTERM stops the daemon and leaves the interface and its peers as the last desired state said,
so an agent restart does not drop buyers' tunnels or reset their counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import websockets

from . import frames, reconcile, repin, rtt, wire
from .backends.base import PeerStatus, WireGuardBackend
from .backends.errors import WireGuardError
from .firewall import Firewall, FirewallError, SandboxRule, render_ruleset, sandbox_rules
from .gpu import GpuReader
from .job_peers import check_job_peers, check_mesh_peers
from .journal import EpochJournal
from .keys import Identity
from .metering import Meter
from .names import NamesResponder
from .names import apply_envelope as apply_names
from .path_checks import PathChecks
from .reconnect import reconnect_wait
from .retirement import PeerRetirement
from .sandbox.disabled import NoSandboxes
from .sandbox.engine import Sandboxes
from .send_order import STAGGER_SECONDS, SendOrder, StaggeredSends
from .state import AgentStatus, Enrollment, StateDir, StateError


class Revoked(Exception):
    """The gateway does not know this node (revoked or never enrolled): re-run join."""


@dataclass(frozen=True)
class Timing:
    heartbeat: float = 5.0
    metering: float = 10.0
    inventory: float = 60.0
    sandbox_status: float = 1.0  # how often sandboxes that changed are reported
    connectivity: float = 300.0  # how often the path to the hub is tested (clawnode.connectivity)
    round_trips: float = rtt.INTERVAL  # how often the live job peers are pinged (clawnode.rtt)
    stagger: float = STAGGER_SECONDS  # the second side's wait in a node pair (clawnode.send_order)
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class Agent(PeerRetirement, StaggeredSends, PathChecks):
    timing: Timing  # PathChecks declares it loosely: it cannot import this module

    def __init__(
        self,
        *,
        state: StateDir,
        enrollment: Enrollment,
        identity: Identity,
        backend: WireGuardBackend,
        firewall: Firewall,
        gpus: GpuReader,
        sandboxes: Sandboxes | None = None,
        images: tuple[str, ...] = (),
        names: NamesResponder | None = None,
        pinger: rtt.Pinger | None = None,
        timing: Timing = Timing(),
        say: Callable[[str], None] = print,
    ) -> None:
        self.state = state
        self.enrollment = enrollment
        self.identity = identity
        self.backend = backend
        self.firewall = firewall
        self.gpus = gpus
        # Without a sandbox engine the node runs no sandboxes and says so for each one asked.
        self.sandboxes: Sandboxes = sandboxes if sandboxes is not None else NoSandboxes()
        self.images = images
        self.names = names  # the DNS responder, fed the gateway's signed names tables
        # Pings the job peers for their round trips (clawnode.rtt); None: the agent measures
        # none (a gateway is not told "no answer" for what was never asked).
        self.pinger = pinger
        self.timing = timing
        self.say = say
        # The sandbox rules the firewall holds now; at start, those it held when the last
        # agent stopped (the job peers on the interface are still there).
        self._sandbox_rules: tuple[SandboxRule, ...] | None = self._saved_sandbox_rules()
        # The last applied revision survives a restart (status.json), so a replayed older
        # state is refused after a restart too.
        previous = state.read_status() if state.status_path.exists() else None
        self.applied_revision = previous.revision if previous is not None else -1
        self.journal = EpochJournal(state.path)
        self.meter = Meter(identity, self.journal)
        self.since = int(time.time())
        self._welcomed = False
        self._accepts: frozenset[str] = frozenset()  # optional frames the gateway takes (welcome)
        self._challenge = ""
        self._refused = ""
        self._lock = asyncio.Lock()  # one reconcile or sample at a time: counters stay coherent
        # The interface's peers as the agent believes them to be; None: read the device first.
        self._view: dict[str, PeerStatus] | None = None
        self._desired: wire.DesiredState | None = None  # the last one applied
        # The endpoints the last applied desired state named (reconcile.named_endpoints): a
        # live peer's endpoint moves despite its handshake only while it is still the one the
        # gateway named (a relayed path upgrading to direct, docs/nat.md). Kept across
        # reconnects, unlike _desired: what the agent applied is still what the device was
        # told. Not kept across a restart: the agent then never moves a live endpoint.
        self._named_endpoints: dict[str, str] = {}
        self._drift_reported = ""
        # Set when a peer was retired: _removals reads its final counters and removes it.
        self._removals_due = asyncio.Event()
        # Node-to-node peers this node sends to second, held back a moment (clawnode.send_order);
        # kept across reconnects, as the device keeps what was held.
        self._order = SendOrder(timing.stagger)
        self._order_due = asyncio.Event()

    # -- local state -------------------------------------------------------------------------

    def _status(self, state: str, detail: str = "") -> None:
        now = int(time.time())
        with contextlib.suppress(OSError):
            self.state.write_status(
                AgentStatus(
                    state=state,
                    since=self.since,
                    updated_at=now,
                    pid=os.getpid(),
                    detail=detail[:500],
                    revision=max(self.applied_revision, 0),
                )
            )

    # -- interface ---------------------------------------------------------------------------

    def bring_up(self) -> None:
        e = self.enrollment
        # The job block is routed onto the interface: buyers' addresses are not on-link with
        # the node's, and a sandbox's replies must find their way back into the tunnel.
        self.backend.ensure_interface(
            e.interface,
            self.identity.wireguard_private_key,
            e.listen_port,
            e.interface_address,
            routes=e.routes,
        )
        # The sandbox pairs of the last state applied (by this process or, saved, the last):
        # a job peer left on the interface stays confined to its sandbox across a restart.
        rules = self._sandbox_rules or ()
        self.firewall.apply(e.interface, e.mesh_address, rules)
        self._sandbox_rules = rules
        self.say(
            f"interface {e.interface} up at {e.interface_address}, {', '.join(e.routes)} routed "
            f"to it ({self.backend.kind})"
        )

    # -- the connection loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; raises Revoked when the gateway refuses this node."""
        # Off the event loop: pyroute2's synchronous IPRoute (the kernel backend) runs an asyncio
        # loop of its own, and the userspace backend waits for a child process.
        await asyncio.to_thread(self.bring_up)
        backoff = self.timing.backoff_initial
        while not stop.is_set():
            self._status("connecting")
            try:
                async with websockets.connect(
                    self.enrollment.websocket_url, open_timeout=10, max_size=16 * 1024 * 1024
                ) as ws:
                    await self._session(ws, stop)
            except Revoked:
                self._status("refused", "the gateway does not know this node: run clawnode join")
                raise
            except WireGuardError as exc:
                # The device failed under us (wireguard-go died, the interface was deleted by
                # hand): bring it up again, then reconnect; the gateway resends the full state.
                self.say(f"WireGuard device error ({exc}); bringing {self.enrollment.interface} up")
                self._status("disconnected", f"WireGuardError: {exc}")
                try:
                    await asyncio.to_thread(self.bring_up)
                except WireGuardError as again:
                    self.say(f"could not bring the interface up: {again}")
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                detail = f"{type(exc).__name__}: {exc}"
                self.say(f"gateway connection lost ({detail}); retrying")
                self._status("disconnected", detail)
            if stop.is_set():
                break
            if self._welcomed:
                # Only a session that got past auth resets the backoff: a node refused right
                # after connecting (clock skew, refused inventory) must not retry every 0.5 s.
                backoff = self.timing.backoff_initial
                self._welcomed = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), reconnect_wait(backoff))
            backoff = min(backoff * 2, self.timing.backoff_max)
        self._status("stopped")

    async def _send(self, ws: Any, frame: dict[str, Any]) -> None:
        await ws.send(json.dumps(frame))

    async def _session(self, ws: Any, stop: asyncio.Event) -> None:
        # Whatever happened while disconnected (or before a restart), start from the device and
        # from the desired state the gateway sends on connecting.
        self._view = None
        self._desired = None
        # Retired peers are found again from the device by this session's first reconcile.
        self._removals_due = asyncio.Event()
        self._order_due = asyncio.Event()  # held peers stay held: _staggered looks at them first
        challenge = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if challenge.get("type") != "challenge":
            raise websockets.InvalidMessage(f"expected a challenge, got {challenge.get('type')!r}")
        self._challenge = str(challenge["challenge"])
        self._refused = ""  # the reason of a verified, signed refusal on this connection
        await self._send(ws, frames.auth(self.identity, self._challenge))
        tasks = [
            asyncio.ensure_future(self._receive(ws)),
            asyncio.ensure_future(self._heartbeats(ws)),
            asyncio.ensure_future(self._metering(ws)),
            asyncio.ensure_future(self._removals(ws)),
            asyncio.ensure_future(self._sandbox_reports(ws)),
            asyncio.ensure_future(self._connectivity(ws)),
            asyncio.ensure_future(self._round_trips(ws)),
            asyncio.ensure_future(self._staggered(ws)),
            asyncio.ensure_future(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, ws: Any) -> None:
        try:
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    raise websockets.InvalidMessage(
                        "the gateway sent a frame that is not JSON"
                    ) from None
                if not isinstance(frame, dict):
                    raise websockets.InvalidMessage(
                        "the gateway sent a frame that is not an object"
                    )
                kind = frame.get("type")
                if kind == "welcome":
                    self._welcomed = True
                    accepts = frame.get("accepts")
                    accepts = accepts if isinstance(accepts, list) else []
                    self._accepts = frozenset(a for a in accepts if isinstance(a, str))
                    self.say(f"connected to the gateway as {frame.get('name')}")
                    self._status("connected")
                    await self._resend_finals(ws)
                    await self._send_inventory(ws)
                    # Every sandbox this agent has, if it has any: a gateway that predates
                    # sandboxes refuses the frame, and a node with none has nothing to say
                    # until a desired state asks for one.
                    await self._send_sandbox_status(ws, full=True, if_any=True)
                elif kind == "desired_state":
                    await self._apply_desired(ws, frame.get("envelope"), frame.get("key_certs"))
                    if self.names is not None and "names" in frame:  # clawnode.names
                        refused = apply_names(
                            self.names, frame["names"], gateway_key=self.enrollment.gateway_key,
                            node_id=self.identity.node_id, desired=self._desired,
                        )  # fmt: skip
                        if refused:
                            self.say(refused)
                elif kind == "refused":
                    self._check_refusal(frame.get("envelope"))
                elif kind == "error":
                    self.say(f"gateway says: {frame.get('detail')}")
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code == wire.CLOSE_FORBIDDEN:
                if self._refused:
                    raise Revoked(self._refused) from None
                # Anyone on the path can close a websocket with 4403: without the gateway's
                # signed refusal it is a disconnection like any other, retried with backoff.
                self.say(
                    "the connection was closed as 'refused' without the gateway's signed "
                    "refusal; not trusted, retrying"
                )
            raise

    def _check_refusal(self, envelope: Any) -> None:
        """Keep the reason of a refusal signed by the pinned gateway key, for this node and this
        connection's challenge; anything else is ignored (and said)."""
        try:
            if not isinstance(envelope, dict):
                raise wire.BadSignature("refusal is not a signed envelope")
            body = wire.open_envelope(envelope, self.enrollment.gateway_key, wire.REFUSAL)
            refusal = wire.Refusal.from_dict(body)
            if refusal.node_id != self.identity.node_id:
                raise wire.ProtocolError("refusal is for another node")
            if refusal.challenge != self._challenge:
                raise wire.ProtocolError("refusal names another connection's challenge")
        except (wire.BadSignature, wire.ProtocolError) as exc:
            self.say(f"ignored a refusal that does not hold: {exc}")
            return
        self._refused = refusal.reason or "refused"

    # -- desired state -----------------------------------------------------------------------

    async def _apply_desired(self, ws: Any, envelope: Any, key_certs: Any = None) -> None:
        try:
            # Signed by the pinned key, or by a key the gateway rotated to, through its chain
            # of certificates from the pinned key (clawnode.repin).
            body, repinned = repin.open_desired_state(
                envelope, self.enrollment, key_certs, int(time.time())
            )
            # Peers unchanged since the last state applied are not checked again.
            desired = wire.DesiredState.from_dict(body, known=self._desired)
            if desired.node_id != self.identity.node_id:
                raise wire.ProtocolError("desired state is for another node")
            check_job_peers(desired, self.enrollment.job_network, known=self._desired)
            check_mesh_peers(desired)
            if repinned is not None:
                self._repin(repinned)
        except (wire.BadSignature, wire.ProtocolError, StateError, OSError) as exc:
            # A compromised bus must not add peers: refuse, keep the current peers, tell.
            self.say(f"refused a desired state: {exc}")
            await self._send(ws, {"type": "report", "detail": f"refused desired state: {exc}"})
            return
        if desired.revision < self.applied_revision:
            return  # an older state that arrived late; the newer one is already applied
        async with self._lock:
            # Sandboxes first: those no longer desired are removed (container, then network)
            # before their peers are touched; new ones start in the background.
            await self._apply_sandboxes(desired)
            new_rules = sandbox_rules(desired)
            # Until the peers are reconciled the firewall holds the old pairs and the new: a
            # peer about to be added is already confined to its sandbox, and one about to be
            # cut off is still confined to its own.
            old_rules = self._sandbox_rules or ()
            await self._set_firewall(tuple(sorted(set(old_rules) | set(new_rules))))
            if self._view is None:
                self._view = await asyncio.to_thread(self.backend.list_peers)
            named, now = self._named_endpoints, int(time.time())
            actions = reconcile.plan(desired, self._view, now=now, previous=named)
            if any(isinstance(a, reconcile.Update) and "endpoint" in a.changed for a in actions):
                # Moving an endpoint depends on the peer's latest handshake (never one of the
                # last 180 s, unless the endpoint is still the one named last) and on where
                # WireGuard roamed it: the view's may be a sample old, so read the device (rare:
                # a buyer's mapping changed, an upgrade, docs/nat.md) and plan again.
                self._view = await asyncio.to_thread(self.backend.list_peers)
                actions = reconcile.plan(desired, self._view, now=now, previous=named)
            # A node peer this node sends to second gets its endpoint a moment later (_staggered).
            actions = self._order.order(desired, self._view, actions, now, time.monotonic())
            if self._order.pending() is not None:
                self._order_due.set()
            results = await self._apply(desired, actions)
            self._named_endpoints = reconcile.named_endpoints(desired)
            # A peer cut off carries no allowed IPs: its pair can go now.
            await self._set_firewall(new_rules)
            if self._view is None:  # a change was refused: where the device is now is unknown
                self._view = await asyncio.to_thread(self.backend.list_peers)
            self.applied_revision = desired.revision
            # Peers the revision took off are retired (cut off) now and removed once their final
            # counters are read (_finish_removals): the ack says they are still leaving. One
            # whose retirement was refused is in the results as failed instead.
            removing = [
                key
                for key in reconcile.leaving(desired, self._view)
                if results.get(key, reconcile.OK) == reconcile.OK
            ]
        if removing:
            self._removals_due.set()
        await self._send(ws, frames.ack(self.identity, desired.revision, results, removing))
        if desired.sandboxes or old_rules:
            # Where every sandbox stands now (those just removed gone from it); a node with
            # no sandboxes before or after says nothing new.
            await self._send_sandbox_status(ws, full=True)
        changed = ", ".join(f"{type(a).__name__.lower()} {a.public_key[:8]}…" for a in actions)
        self.say(f"revision {desired.revision} applied ({changed or 'no change'})")
        self._status("connected")

    def _repin(self, enrollment: Enrollment) -> None:
        """Pin the gateway's new key: saved first (0600, atomically), so an agent that dies
        after applying the state still trusts the key on its next start."""
        self.state.save_enrollment(enrollment)
        self.enrollment = enrollment
        self.say(
            f"gateway key rotated: pinned {enrollment.gateway_public_key} "
            f"(certificate {enrollment.gateway_key_sequence})"
        )

    async def _apply_sandboxes(self, desired: wire.DesiredState) -> None:
        """Hand the state's sandboxes to the manager. Its failures for one sandbox show in that
        sandbox's report; one that escapes must not keep the peers from being reconciled."""
        try:
            await asyncio.to_thread(self.sandboxes.apply, desired.sandboxes)
        except Exception as exc:  # reported; the peers are still reconciled
            self.say(f"applying the sandboxes of revision {desired.revision} failed: {exc}")

    async def _set_firewall(self, rules: tuple[SandboxRule, ...]) -> None:
        """Replace the table with these sandbox rules, if they are not what it holds."""
        if rules == self._sandbox_rules:
            return
        e = self.enrollment
        try:
            await asyncio.to_thread(self.firewall.apply, e.interface, e.mesh_address, rules)
        except FirewallError as exc:
            # The table nft refused to replace is still the last one: what is known stays.
            self.say(f"updating the firewall failed: {exc}")
            return
        self._sandbox_rules = rules
        try:
            await asyncio.to_thread(
                self.state.write_sandbox_rules, [dataclasses.asdict(rule) for rule in rules]
            )
        except OSError as exc:
            self.say(f"could not save the sandbox rules ({exc}); a restart starts without them")

    def _saved_sandbox_rules(self) -> tuple[SandboxRule, ...] | None:
        try:
            rules = tuple(
                sorted(
                    # JSON gives the members as a list: the rule is hashable with a tuple
                    SandboxRule(**{**rule, "mesh": tuple(rule.get("mesh", ()))})
                    for rule in self.state.read_sandbox_rules()
                )
            )
            # What the table would refuse is not taken (nor is it what the last agent applied).
            render_ruleset(self.enrollment.interface, self.enrollment.mesh_address, rules)
            return rules or None
        except (StateError, TypeError, ValueError, OSError) as exc:
            self.say(f"ignoring the saved sandbox rules: {exc}")
            return None

    async def _apply(
        self, desired: wire.DesiredState, actions: list[reconcile.Action]
    ) -> dict[str, str]:
        """Apply `actions` (planned for `desired` against the view); keep the view, the epochs
        and the last applied state in step. Call with the lock held."""
        # A peer (re-)added starts its counters at zero: a new epoch says so. Handed out before
        # the device has the peer; a peer the device refused keeps it, harmlessly (it is not
        # there, and is pruned, or is still desired and gets another when added again).
        self.journal.hand_out(a.public_key for a in actions if isinstance(a, reconcile.Add))
        try:
            results = (
                await asyncio.to_thread(reconcile.apply, self.backend, actions) if actions else {}
            )
        except BaseException:
            self._view = None  # the device may be anywhere between before and after
            raise
        self._desired = desired
        if self._view is not None and not reconcile.update_view(self._view, actions, results):
            self._view = None  # a change was refused: that peer is now in an unknown state
        if any(
            isinstance(a, reconcile.Retire) and results[a.public_key] == reconcile.OK
            for a in actions
        ):
            self._removals_due.set()
        self._prune_epochs(desired)
        return results

    def _prune_epochs(self, desired: wire.DesiredState) -> None:
        """Forget the epochs of peers that are neither desired nor on the interface (only when
        the view is known: a peer whose removal failed is still there and keeps its epoch)."""
        view = self._view
        if view is None:
            return
        gone = [key for key in self.journal.epochs if key not in view]
        if gone:
            wanted = {peer.public_key for peer in desired.peers}
            self.journal.forget([key for key in gone if key not in wanted])

    # -- heartbeats, inventory, metering ---------------------------------------------------------

    async def _send_inventory(self, ws: Any) -> None:
        report = await asyncio.to_thread(self.gpus.read)
        await self._send(ws, frames.inventory(report, self.images, self.names is not None))

    async def _send_sandbox_status(self, ws: Any, *, full: bool, if_any: bool = False) -> None:
        """A signed SANDBOX_STATUS: every sandbox (full), or those changed since the last
        call; nothing when nothing changed, nor (if_any) when there is no sandbox at all."""
        reports = await asyncio.to_thread(self.sandboxes.reports, changed_only=not full)
        if reports or (full and not if_any):
            await self._send(ws, frames.sandbox_status(self.identity, reports, full=full))

    async def _sandbox_reports(self, ws: Any) -> None:
        while True:
            await asyncio.sleep(self.timing.sandbox_status)
            await self._send_sandbox_status(ws, full=False)

    async def _heartbeats(self, ws: Any) -> None:
        last_inventory = time.monotonic()
        while True:
            await self._send(ws, {"type": "heartbeat"})
            self._status("connected")
            await asyncio.sleep(self.timing.heartbeat)
            if time.monotonic() - last_inventory >= self.timing.inventory:
                await self._send_inventory(ws)
                last_inventory = time.monotonic()

    async def _send_sample(self, ws: Any, peers: dict[str, PeerStatus]) -> None:
        await self._send(ws, frames.metering(self.meter.sample(peers)))

    async def _resend_finals(self, ws: Any) -> None:
        """On a new session, before anything else can close their keys: send again the final
        counters of the peers removed lately (Meter.finals_to_resend)."""
        finals = self.meter.finals_to_resend()
        if finals:
            await self._send(ws, frames.metering(self.meter.envelope(finals)))

    async def _metering(self, ws: Any) -> None:
        while True:
            await asyncio.sleep(self.timing.metering)
            await self._sample_once(ws)

    async def _sample_once(self, ws: Any) -> None:
        """One metering sample of every peer, and what follows it."""
        async with self._lock:
            peers = await asyncio.to_thread(self.backend.list_peers)
            await self._send_sample(ws, peers)
            # The device as it is now: a change made behind the agent's back shows here.
            self._view = dict(peers)
            # The sample just sent has the final counters of any retired peer: remove them.
            self.meter.keep_finals(
                reconcile.retired(self._desired, peers) if self._desired else (), peers
            )
            removed = await self._remove_retired(set(peers))
            await self._restore_drift(ws)
            if self.journal.unsaved:
                self.journal.save()
        await self._send_removed(ws, removed)
