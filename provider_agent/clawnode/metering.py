"""The agent's metering: signed samples of its peers' cumulative WireGuard counters, each with
the peer's epoch (clawnode.journal), and the final counters of peers removed lately, kept to be
sent again.

A sample is named by (``boot_id``, ``seq``): one boot id per agent process, seq counting up, so
the gateway stores a resent sample once. The gateway turns the counters into deltas (with reset
detection by epoch) and bills them; nothing here subtracts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import wire
from .backends.base import PeerStatus
from .journal import EpochJournal
from .keys import Identity

__all__ = ["RESEND_FINALS_SECONDS", "Meter"]

# How long the final counters of a removed peer are kept to send again after a reconnect: longer
# than it takes the websocket to notice a dead connection (websockets pings every 20 s and
# gives up after 20 s more) plus the longest reconnect backoff (30 s).
RESEND_FINALS_SECONDS = 120.0


class Meter:
    """Makes the signed METERING envelopes of one agent process."""

    def __init__(self, identity: Identity, journal: EpochJournal) -> None:
        self.identity = identity
        self.journal = journal
        self.boot_id = wire.new_nonce()
        self.seq = 0
        # The final counters of peers removed lately, with when they were sent: a connection
        # that dies right after may have lost them, and nothing else can carry them any more
        # (the peer is gone), so the next session sends them again first (finals_to_resend).
        self._recent_finals: dict[str, tuple[float, wire.PeerCounters]] = {}

    def sample(self, peers: Mapping[str, PeerStatus]) -> dict[str, Any]:
        """The signed sample of ``peers``' counters. Every epoch it carries is made durable
        first (EpochJournal.make_durable): the gateway must never see an epoch a restart could
        hand out again."""
        self.journal.make_durable(peers)
        return self.envelope(
            [
                wire.PeerCounters(
                    public_key=key,
                    epoch=self.journal.epoch(key),
                    rx_bytes=status.rx_bytes,
                    tx_bytes=status.tx_bytes,
                )
                for key, status in sorted(peers.items())
            ]
        )

    def envelope(self, counters: Iterable[wire.PeerCounters]) -> dict[str, Any]:
        """The next sample (seq) of these counters, signed by the node."""
        self.seq += 1
        body = wire.MeteringSample(
            node_id=self.identity.node_id,
            boot_id=self.boot_id,
            seq=self.seq,
            sampled_at=int(time.time()),
            peers=tuple(counters),
        ).to_dict()
        return wire.signed_envelope(wire.METERING, body, self.identity)

    def keep_finals(self, keys: Iterable[str], peers: Mapping[str, PeerStatus]) -> None:
        """Note the final counters (just sent) of the peers about to be removed. Call before
        removing them: their epochs are forgotten with them."""
        now = time.monotonic()
        self._forget_old_finals(now)
        for key in keys:
            status = peers[key]
            self._recent_finals[key] = (
                now,
                wire.PeerCounters(key, self.journal.epoch(key), status.rx_bytes, status.tx_bytes),
            )

    def finals_to_resend(self) -> list[wire.PeerCounters]:
        """The final counters of the peers removed in the last RESEND_FINALS_SECONDS, to send
        again on a new session. The gateway counts each byte once whatever arrives twice (same
        epoch, same counters: nothing new), and ignores a key it has closed already."""
        self._forget_old_finals(time.monotonic())
        finals = self._recent_finals
        return [finals[key][1] for key in sorted(finals)]

    def _forget_old_finals(self, now: float) -> None:
        horizon = now - RESEND_FINALS_SECONDS
        self._recent_finals = {k: v for k, v in self._recent_finals.items() if v[0] >= horizon}
