"""One relayed job peer: a port pair and where each side is (pure, no sockets).

The buyer's client sends to `relay:buyer_port` (its wg-quick Endpoint), the provider's agent to
`relay:provider_port` (the endpoint of the buyer's peer in its signed desired state). The relay
forwards between the two, never reading more than WireGuard's cleartext headers (wgmsg).

Where each side is, is learned from its packets, as WireGuard's own roaming learns a peer's
endpoint, but a relay cannot authenticate a packet, so it moves a side only on proof a third
party cannot forge from off the path:

- a side nobody has heard yet takes the source of its first valid handshake message
  (provisional: something must be first, and the peer behind the other port cannot answer
  anything before it is known);
- a handshake initiation from a side (mac1 made for the other side's public key) is
  remembered by its sender index and source; when the other side's response names that index
  as its receiver, the initiation's source becomes that side's address and the response's
  source the other's, before the response is forwarded. Only a peer that received the
  initiation knows its index, and only the genuine peer accepts a fresh initiation (WireGuard
  refuses replays by their timestamp), so a new source wins exactly when a real handshake was
  made from it: latest *handshaken* source wins;
- transport data from a side's current address passes. From a new address it moves the side
  only when it names a session the relay saw made (its receiver index is one the other side
  chose in a handshake completed through the relay: 32 random bits that only the path's
  packets show) with a counter above every one the relay saw in that session (a copy of a
  packet it forwarded itself moves nothing; what the kernel forwards it does not see); else
  it is dropped, so strangers' packets are
  never reflected to a provider. This is how a side whose address changed under it is found
  again on its next packet: a provider's home router that reboots onto a new address or port
  is the usual case, and the provider is usually the side that sends nothing but its
  keepalive (every 25 s) until its buyer's packets reach it again, while it answers the
  buyer's handshakes only once they do: waiting for a handshake from it would wait for its
  session to expire (up to 3 minutes). Cookie replies pass only from the current address.

An attacker off the path who knows a port pair and the provider's public key can send
initiations through the relay (the provider drops them: they decrypt to nothing), and make the
relay drop its kernel fast path for the pair until the next genuine handshake (the traffic
still flows through Python). It cannot move a side, read or change any tunnel's contents (the
relay has no key), or use the relay to reach anything but the two peers. One that sees the
pair's packets (on the path) can move a side to itself with a forged counter until that side's
next handshake (at most 2 minutes, WireGuard's rekey): it gets ciphertext and denies service,
which such an attacker can do anyway by dropping the packets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshnet.relay import wgmsg

Address = tuple[str, int]
BUYER, PROVIDER = "buyer", "provider"
# An initiation waits this long for its response (WireGuard's REKEY_TIMEOUT is 5 s).
PENDING_SECONDS = 10.0
# At most this many initiations remembered per side: a flood of initiations costs memory only
# this much.
PENDING_MAX = 16
# Sessions remembered per side for its transport data (WireGuard keeps the current, previous and
# next keypair of a peer).
SESSIONS_MAX = 3


@dataclass(frozen=True)
class Allocation:
    """What the gateway tells the relay about one relayed job peer: public keys only."""

    id: str
    buyer_port: int
    provider_port: int
    buyer_key: str  # the job peer's (buyer's) WireGuard public key
    provider_key: str  # the provider node's WireGuard public key

    def port(self, side: str) -> int:
        """The relay port `side` sends to (and receives the other side's packets from)."""
        return self.buyer_port if side == BUYER else self.provider_port

    @classmethod
    def from_dict(cls, data: dict) -> Allocation:
        allocation = cls(
            id=str(data["id"]),
            buyer_port=int(data["buyer_port"]),
            provider_port=int(data["provider_port"]),
            buyer_key=str(data["buyer_key"]),
            provider_key=str(data["provider_key"]),
        )
        for port in (allocation.buyer_port, allocation.provider_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"port out of range: {port}")
        if allocation.buyer_port == allocation.provider_port:
            raise ValueError("a pair needs two ports")
        wgmsg.mac1_key(allocation.buyer_key)
        wgmsg.mac1_key(allocation.provider_key)
        return allocation


@dataclass
class Side:
    address: Address | None = None
    # sender index -> (source, when) of this side's initiations not answered yet
    pending: dict[int, tuple[Address, float]] = field(default_factory=dict)
    # receiver index its transport data carries (the other side's, from a handshake completed
    # through the relay) -> the highest counter forwarded in that session (-1: none yet)
    sessions: dict[int, int] = field(default_factory=dict)

    def learn_session(self, index: int) -> None:
        self.sessions.pop(index, None)
        while len(self.sessions) >= SESSIONS_MAX:
            self.sessions.pop(next(iter(self.sessions)))
        self.sessions[index] = -1


@dataclass
class Counters:
    forwarded: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0, 3: 0, 4: 0})
    forwarded_bytes: int = 0
    dropped: int = 0
    moved: int = 0  # times a side's address changed after it was first learned


@dataclass
class Pair:
    allocation: Allocation
    sides: dict[str, Side] = field(default_factory=lambda: {BUYER: Side(), PROVIDER: Side()})
    handshaken: bool = False  # a handshake completed through the relay at these addresses
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        # mac1 of a message sent from a side is keyed by the *other* side's public key.
        self._mac1_from = {
            BUYER: wgmsg.mac1_key(self.allocation.provider_key),
            PROVIDER: wgmsg.mac1_key(self.allocation.buyer_key),
        }

    @staticmethod
    def other(side: str) -> str:
        return PROVIDER if side == BUYER else BUYER

    @property
    def both_known(self) -> bool:
        return all(side.address is not None for side in self.sides.values())

    def _set(self, name: str, address: Address) -> bool:
        side = self.sides[name]
        if side.address == address:
            return False
        if side.address is not None:
            self.counters.moved += 1
        side.address = address
        return True

    def foreign_initiation(self, from_side: str, data: bytes) -> bool:
        """Whether `data` is a well-formed initiation made for another pair's peer (its mac1
        is not for this pair's other side): the gateway gives a closed pair's ports to the next
        one at once, so its first packet can reach the relay while the old pair still holds
        them."""
        message = wgmsg.parse(data)
        return (
            message is not None
            and message.type == wgmsg.INITIATION
            and not wgmsg.mac1_valid(data, self._mac1_from[from_side])
        )

    def receive(
        self, from_side: str, source: Address, data: bytes, now: float
    ) -> tuple[Address | None, bool]:
        """A packet from `source` arrived on `from_side`'s port: where to forward it (None:
        drop) and whether a side's address changed (the fast path must follow)."""
        message = wgmsg.parse(data)
        this, other = self.sides[from_side], self.sides[self.other(from_side)]
        if message is None or not wgmsg.mac1_valid(data, self._mac1_from[from_side]):
            self.counters.dropped += 1
            return None, False
        changed = False
        if message.type == wgmsg.INITIATION:
            assert message.sender is not None
            if this.address is None:
                changed = self._set(from_side, source)
            for index, (_, at) in list(this.pending.items()):
                if now - at > PENDING_SECONDS:
                    del this.pending[index]
            if len(this.pending) >= PENDING_MAX:
                this.pending.pop(next(iter(this.pending)))
            this.pending[message.sender] = (source, now)
        elif message.type == wgmsg.RESPONSE:
            assert message.receiver is not None
            answered = other.pending.pop(message.receiver, None)
            if answered is not None and now - answered[1] > PENDING_SECONDS:
                answered = None  # too late to be the answer WireGuard would still accept
            if answered is not None:
                changed = self._set(self.other(from_side), answered[0]) | changed
                changed = self._set(from_side, source) | changed
                self.handshaken = True
                # The initiator's data will name the responder's index, and the other way.
                assert message.sender is not None
                other.learn_session(message.sender)
                this.learn_session(message.receiver)
            elif this.address is None:
                changed = self._set(from_side, source)
            elif source != this.address:
                self.counters.dropped += 1
                return None, False
        elif message.type == wgmsg.TRANSPORT:
            assert message.receiver is not None
            seen = this.sessions.get(message.receiver)
            count = wgmsg.counter(data)
            if source != this.address:
                # Only a session made through the relay, and never a copy (see the docstring).
                if seen is None or count <= seen:
                    self.counters.dropped += 1
                    return None, False
                changed = self._set(from_side, source)
            if seen is not None and count > seen:
                this.sessions[message.receiver] = count
        elif source != this.address:
            # Cookie replies only from where the side handshook.
            self.counters.dropped += 1
            return None, False
        if other.address is None:
            self.counters.dropped += 1
            return None, changed
        self.counters.forwarded[message.type] += 1
        self.counters.forwarded_bytes += len(data)
        return other.address, changed

    def status(self) -> dict:
        return {
            "id": self.allocation.id,
            "buyer_port": self.allocation.buyer_port,
            "provider_port": self.allocation.provider_port,
            "buyer": _text(self.sides[BUYER].address),
            "provider": _text(self.sides[PROVIDER].address),
            "handshaken": self.handshaken,
            "forwarded": {str(kind): n for kind, n in self.counters.forwarded.items()},
            "forwarded_bytes": self.counters.forwarded_bytes,
            "dropped": self.counters.dropped,
            "moved": self.counters.moved,
        }


def _text(address: Address | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
