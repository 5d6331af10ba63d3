"""Retired peers, for clawnode.daemon's Agent: the final counters of the peers a desired state
took off are read and sent, then the peers removed and reported "removed"; and an interface that
drifted from the last applied desired state (someone ran `wg set` by hand) is put back.

A mixin: the methods run on the Agent, with its lock, view and connection; the attributes and
methods they use are declared here for the type checker and set or defined by the Agent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from . import frames, reconcile, wire
from .backends.base import PeerStatus, WireGuardBackend
from .keys import Identity
from .metering import Meter
from .send_order import SendOrder


class PeerRetirement:
    backend: WireGuardBackend
    identity: Identity
    meter: Meter
    say: Callable[[str], None]
    _lock: asyncio.Lock
    _view: dict[str, PeerStatus] | None
    _desired: wire.DesiredState | None
    _drift_reported: str
    _removals_due: asyncio.Event
    _order: SendOrder

    async def _send(self, ws: Any, frame: dict[str, Any]) -> None:
        raise NotImplementedError  # the Agent's

    async def _send_sample(self, ws: Any, peers: dict[str, PeerStatus]) -> None:
        raise NotImplementedError  # the Agent's

    async def _apply(
        self, desired: wire.DesiredState, actions: list[reconcile.Action]
    ) -> dict[str, str]:
        raise NotImplementedError  # the Agent's

    async def _removals(self, ws: Any) -> None:
        while True:
            await self._removals_due.wait()
            self._removals_due.clear()
            await self._finish_removals(ws)

    async def _finish_removals(self, ws: Any) -> None:
        """Read the final counters of the retired peers, send them, remove the peers, and tell
        the gateway they are gone.

        The read is a dump of the whole device (milliseconds at a thousand peers) and is made
        without the lock, so changes for other peers are not held up by it: a retired peer has
        no allowed IPs, so nothing a buyer can use passes it any more. What it still counts
        between the read and the removal is what it refuses (a cut-off buyer's packets, dropped
        after decryption, and its handshakes), the bytes a read just before a removal always
        missed too. Peers retired meanwhile are read on the next round; a peer desired again
        meanwhile is not removed."""
        while True:
            async with self._lock:
                if self._desired is None:
                    return  # no desired state applied in this session yet: nothing is retired
                if self._view is None:
                    self._view = await asyncio.to_thread(self.backend.list_peers)
                keys = reconcile.retired(self._desired, self._view)
                if not keys:
                    return
                read = self.backend.start_read()
            try:
                last = await asyncio.to_thread(read.peers, keys)
            finally:
                read.close()
            async with self._lock:
                if self._desired is None or self._view is None:
                    return  # the session is starting over: its first reconcile reads anew
                still = set(reconcile.retired(self._desired, self._view))
                last = {key: status for key, status in last.items() if key in still}
                if last:
                    await self._send_sample(ws, last)
                # A retired peer the read did not find is not on the device any more.
                vanished = [key for key in keys if key in still and key not in last]
                for key in vanished:
                    self._view.pop(key, None)
                self.meter.keep_finals(last, last)
                removed = await self._remove_retired(set(last)) + vanished
                failed = len(removed) < len(still & set(keys))
            await self._send_removed(ws, removed)
            if failed:
                return  # the next sample retries (see _sample_once), not a busy loop here

    async def _remove_retired(self, counted: set[str]) -> list[str]:
        """Remove the retired peers whose final counters are in `counted` (a sample sent).
        Call with the lock held and the view known; returns the keys removed."""
        desired, view = self._desired, self._view
        if desired is None or view is None:
            return []
        actions: list[reconcile.Action] = [
            reconcile.Remove(key) for key in reconcile.retired(desired, view) if key in counted
        ]
        if not actions:
            return []
        results = await self._apply(desired, actions)
        refused = sorted(key for key, result in results.items() if result != reconcile.OK)
        if refused:
            self.say(f"removing {len(refused)} retired peer(s) failed: {results[refused[0]][:200]}")
        return [a.public_key for a in actions if results.get(a.public_key) == reconcile.OK]

    async def _send_removed(self, ws: Any, keys: list[str]) -> None:
        if not keys:
            return
        await self._send(ws, frames.removed(self.identity, keys))
        self.say(f"removed {', '.join(key[:8] + '…' for key in sorted(keys))}")

    async def _restore_drift(self, ws: Any) -> None:
        """Put back what the last applied desired state says, if the interface drifted from it
        (a peer removed or changed by hand). Call with the lock held, the view just read.

        An endpoint that differs and nothing else is left alone: WireGuard updates a peer's
        endpoint when the peer roams, and setting it back every sample would fight that; the
        next desired state sets it, as before. The counters of a peer removed here were in
        the sample just sent."""
        desired, view = self._desired, self._view
        if desired is None or view is None:
            return
        now = int(time.time())
        # A node peer held back (clawnode.send_order) is not drift: it stays held until due.
        planned = self._order.order(desired, view, reconcile.plan(desired, view, now=now), now,
                                    time.monotonic())  # fmt: skip
        actions = [
            a
            for a in planned
            if not (isinstance(a, reconcile.Update) and a.changed == ("endpoint",))
        ]
        if not actions:
            self._drift_reported = ""
            return
        results = await self._apply(desired, actions)
        failed = sorted(key for key, result in results.items() if result != reconcile.OK)
        what = ", ".join(f"{type(a).__name__.lower()} {a.public_key[:8]}…" for a in actions)
        note = f"the interface had drifted from revision {desired.revision}; restored ({what})"
        if failed:
            note += f"; {len(failed)} refused: {results[failed[0]][:200]}"
        self.say(note)
        if note != self._drift_reported:  # once, not every sample while a peer stays refused
            self._drift_reported = note
            await self._send(ws, {"type": "report", "detail": note[:500]})
