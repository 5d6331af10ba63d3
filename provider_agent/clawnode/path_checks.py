"""The daemon's checks of its paths, each a session task that reports what it found: the
handshake with the gateway's hub (clawnode.connectivity) and the round trip to each job peer
(clawnode.rtt). Both start once the first desired state is applied, and only towards a gateway
whose welcome says it takes their frame: one that predates a frame would close the channel on
it (every wire message refuses what it does not know)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from . import connectivity, rtt, wire
from .backends.base import PeerStatus, WireGuardBackend
from .keys import Identity
from .state import Enrollment


class PathChecks:
    """The daemon's part (the Agent's attributes it reads are declared below)."""

    backend: WireGuardBackend
    identity: Identity
    enrollment: Enrollment
    pinger: rtt.Pinger | None
    timing: Any  # the Agent's Timing (daemon.py, which imports this): .connectivity, .round_trips
    say: Callable[[str], None]
    _lock: asyncio.Lock
    _view: dict[str, PeerStatus] | None
    _desired: wire.DesiredState | None
    _welcomed: bool
    _accepts: frozenset[str]

    async def _send(self, ws: Any, frame: dict[str, Any]) -> None:
        raise NotImplementedError  # the Agent's

    async def _when_applied_and_accepted(self, frame: str) -> None:
        """Return once the first desired state is applied, if the gateway takes `frame`; else
        never (returning would end the session)."""
        while self._desired is None or not self._welcomed:
            await asyncio.sleep(0.2)
        if frame not in self._accepts:
            await asyncio.Event().wait()

    async def _connectivity(self, ws: Any) -> None:
        """Once the first desired state is applied, then every timing.connectivity seconds: test
        the handshake with the hub and report it (clawnode.connectivity). Only to a gateway whose
        welcome says it takes the report: one that predates it would close the channel on it."""
        await self._when_applied_and_accepted("connectivity")
        while True:
            async with self._lock:  # the hub peer is set afresh: no reconcile in between
                probe = await asyncio.to_thread(connectivity.start, self.backend, self._desired)
                self._view = None
            result = await asyncio.to_thread(connectivity.finish, self.backend, probe)
            await self._send(ws, connectivity.frame(self.identity, result))
            rtt = f" ({result.hub_rtt_ms} ms)" if result.hub == "reachable" else ""
            self.say(f"hub {result.hub}{rtt}{': ' + result.detail if result.detail else ''}")
            await asyncio.sleep(self.timing.connectivity)

    async def _round_trips(self, ws: Any) -> None:
        """Once the first desired state is applied, then every timing.round_trips seconds:
        ping the job peers with a live session and report their round trips (clawnode.rtt).
        Only to a gateway whose welcome says it takes the frame (one that predates it would
        close the channel on it), and only when some peer was pinged."""
        await self._when_applied_and_accepted("round_trips")
        pinger = self.pinger
        if pinger is None:
            await asyncio.Event().wait()  # returning would end the session
            return
        said = ""
        while True:
            async with self._lock:  # one device call at a time (the backend's socket)
                peers = await asyncio.to_thread(self.backend.list_peers)
            found = rtt.targets(self._desired, peers, time.time())
            try:
                results = await asyncio.to_thread(
                    rtt.measure, pinger, self.enrollment.mesh_address, found
                )
                said = ""
            except OSError as exc:
                # No raw socket (an agent without CAP_NET_RAW) or no mesh address yet: this
                # round measures nothing, and says so once, not every round (a minute) of an
                # agent that will never have the capability; the session goes on.
                if str(exc) != said:
                    said = str(exc)
                    self.say(f"round trips not measured: {exc}")
                results = []
            if results:
                await self._send(ws, rtt.frame(self.identity, results))
            await asyncio.sleep(self.timing.round_trips)
