"""Metering ingestion, through the real service: whatever order the gateway gets the agent's
signed samples in, it bills exactly the bytes WireGuard counted.

Each example is a run of the agent against two job peers: traffic and a periodic sample of
every peer, peers re-added (their counters restart at zero under a new epoch, with or without the
final counters sent first), agent restarts (a new boot_id, seq from 1 again, epochs and
counters kept), the final counters of a removed peer sent again under a new seq after a
reconnect (late: the key may be in a newer epoch by then), any earlier sample delivered
again, at any later point (a resend after a lost connection), and samples held back and
delivered after later ones (an old connection's consumer still working through its backlog
while the new connection sends: distinct samples of one epoch out of seq order, of the same boot
or of a previous one; whatever is still held at the end is delivered then). Every sample goes
through
meshnet.agent_channel.ingest_metering signed by the node, as the agent channel hands it over.

What WireGuard counted and the samples showed is, per key, the sum over its epochs of the last
reading of each epoch (counters only grow within an epoch): the bill must be exactly that.

Out of scope, on purpose: a restart that lost the epochs (the gateway takes a decrease for one,
and cannot see a restart whose counters have already passed the old ones), an agent clock
that goes back across a restart (across boots the clock is the only order; see
meshnet.metering.stale), and a held sample that alone shows an epoch's last bytes arriving after
a newer epoch's (the gateway keeps one base per key; the agent sends a removed peer's final
counters before re-adding it, so "re-add" without them first delivers what is held).

MOLT_PROPERTY_EXAMPLES sets the number of examples (100 here by default, under a minute on
SQLite). Each example runs in a savepoint rolled back at its end.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.contrib.auth import get_user_model
from django.db import transaction
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.orders import place_order, provision_order
from meshnet.agent_channel import acknowledge_revision, ingest_metering
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import JobPeerKey, Node
from tests.factories import enroll_request, gpu, wg_public_key

pytestmark = [pytest.mark.property, pytest.mark.db, pytest.mark.django_db]

EXAMPLES = int(os.environ.get("MOLT_PROPERTY_EXAMPLES", "100"))
PEERS = 2

peer = st.integers(min_value=0, max_value=PEERS - 1)
later = st.integers(min_value=0, max_value=1000)  # picks one of what exists, modulo
growth = st.integers(0, 5000)
event = st.one_of(
    # Traffic of every peer, then a periodic sample of every peer; the bool: held back, to be
    # delivered after later samples (by "deliver held", or at the end).
    st.tuples(
        st.just("sample"),
        st.lists(st.tuples(growth, growth), min_size=PEERS, max_size=PEERS),
        st.booleans(),
    ),
    st.tuples(st.just("re-add"), peer, st.booleans()),  # the bool: final counters sent first
    st.tuples(st.just("restart")),
    st.tuples(st.just("resend final"), later),
    st.tuples(st.just("deliver again"), later),
    st.tuples(st.just("deliver held"), later),
)


@dataclass
class Agent:
    """What the agent does, and what its samples show: the truth the bill is held to."""

    identity: Identity
    keys: list[str]
    boot: str = field(default_factory=wire.new_nonce)
    seq: int = 0
    next_epoch: int = 1
    epochs: dict[str, int] = field(default_factory=dict)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The last reading sent of each (key, epoch): what the samples showed WireGuard counted.
    shown: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    finals: list[wire.PeerCounters] = field(default_factory=list)
    sent: list[dict] = field(default_factory=list)
    held: list[dict] = field(default_factory=list)  # sent, not delivered yet

    def __post_init__(self) -> None:
        for key in self.keys:
            self.add(key)

    def add(self, key: str) -> None:
        self.epochs[key] = self.next_epoch
        self.next_epoch += 1
        self.counters[key] = (0, 0)

    def reading(self, key: str) -> wire.PeerCounters:
        rx, tx = self.counters[key]
        return wire.PeerCounters(public_key=key, epoch=self.epochs[key], rx_bytes=rx, tx_bytes=tx)

    def send(self, readings: list[wire.PeerCounters]) -> dict:
        self.seq += 1
        body = wire.MeteringSample(
            node_id=self.identity.node_id,
            boot_id=self.boot,
            seq=self.seq,
            sampled_at=int(time.time()),
            peers=tuple(readings),
        ).to_dict()
        envelope = wire.signed_envelope(wire.METERING, body, self.identity)
        self.sent.append(envelope)
        for r in readings:
            # A late final of an older epoch shows nothing new: it was shown when first sent.
            self.shown[(r.public_key, r.epoch)] = (r.rx_bytes, r.tx_bytes)
        return envelope

    def counted(self) -> Counter[str]:
        """Per key and direction, the bytes the samples showed WireGuard counted."""
        total: Counter[str] = Counter()
        for (key, _), (rx, tx) in self.shown.items():
            total[f"{key} rx"] += rx
            total[f"{key} tx"] += tx
        return total


def run(agent: Agent, events: list[tuple], deliver) -> Counter[str]:
    """Play `events`, handing every envelope to `deliver`; returns what came up (coverage)."""
    seen: Counter[str] = Counter()
    for what, *args in events:
        if what == "sample":
            for key, (more_rx, more_tx) in zip(agent.keys, args[0], strict=True):
                rx, tx = agent.counters[key]
                agent.counters[key] = (rx + more_rx, tx + more_tx)
            envelope = agent.send([agent.reading(key) for key in agent.keys])
            if args[1]:
                agent.held.append(envelope)
            else:
                deliver(envelope)
        elif what == "deliver held" and agent.held:
            seen.update(deliver_held(agent, args[0] % len(agent.held), deliver))
        elif what == "re-add":
            key = agent.keys[args[0]]
            if not args[1]:
                # Out of scope: a held sample that alone shows an epoch's last bytes, arriving
                # after a newer epoch's. The gateway keeps one base per key; the agent sends the
                # final counters (and again after a reconnect) before it re-adds a peer.
                while agent.held:
                    seen.update(deliver_held(agent, 0, deliver))
            if args[1]:  # removed as the agent does it: the final counters go first
                final = agent.reading(key)
                deliver(agent.send([final]))
                agent.finals.append(final)
            agent.add(key)
        elif what == "restart":
            agent.boot, agent.seq = wire.new_nonce(), 0
            seen["restart"] += 1
        elif what == "resend final" and agent.finals:
            final = agent.finals[args[0] % len(agent.finals)]
            seen["late final"] += final.epoch < agent.epochs[final.public_key]
            deliver(agent.send([final]))
        elif what == "deliver again" and agent.sent:
            envelope = agent.sent[args[0] % len(agent.sent)]
            seen["delivered again out of order"] += envelope is not agent.sent[-1]
            deliver(envelope)
    # The old connection's backlog drains in the end: every sample arrives at least once.
    while agent.held:
        seen.update(deliver_held(agent, 0, deliver))
    return seen


def deliver_held(agent: Agent, index: int, deliver) -> Counter[str]:
    """Deliver the held sample at `index`, late; says how late (coverage)."""
    envelope = agent.held.pop(index)
    deliver(envelope)
    later_ones = agent.sent[agent.sent.index(envelope) + 1 :]
    return Counter(
        {
            "held past a later sample": bool(later_ones),
            "held past the next boot's": any(
                e["body"]["boot_id"] != envelope["body"]["boot_id"] for e in later_ones
            ),
        }
    )


def test_ingestion_bills_exactly_the_counted_bytes_however_samples_arrive(db):
    users = get_user_model().objects
    # Unusable passwords: hashing one costs more than many examples.
    buyer = users.create_user(username="meter-buyer", password=None)
    provider = users.create_user(username="meter-provider", password=None)
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(
        enroll_request(identity, issued.token, gpus=[gpu(i) for i in range(PEERS)]),
        observed_ip=None,
    ).node
    listing = create_listing(
        provider, node=node, gpu_count=PEERS, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 100_000_000)
    keys = [wg_public_key() for _ in range(PEERS)]
    orders = [
        provision_order(
            place_order(
                buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=k
            ).pk
        ).pk
        for k in keys
    ]
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision)
    assert set(Order.objects.filter(pk__in=orders).values_list("state", flat=True)) == {"running"}
    reached: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(events=st.lists(event, min_size=4, max_size=40))
    # A resend of seq 1 after seq 2, a late final of an older epoch, and distinct samples of
    # one epoch out of seq order (of one boot, then of a previous boot after the next one's):
    # the ways a lower reading arrives that is no restart.
    @example(events=[("sample", [(1000, 1000), (0, 0)], False),
                     ("sample", [(2000, 2000), (0, 0)], False),
                     ("deliver again", 0), ("deliver again", 1)])  # fmt: skip
    @example(events=[("sample", [(1000, 1000), (0, 0)], False), ("re-add", 0, True),
                     ("sample", [(500, 500), (0, 0)], False), ("resend final", 0),
                     ("sample", [(100, 100), (0, 0)], False)])  # fmt: skip
    @example(events=[("sample", [(1000, 1000), (0, 0)], False),
                     ("sample", [(50, 50), (0, 0)], True),
                     ("sample", [(50, 50), (0, 0)], False), ("deliver held", 0),
                     ("sample", [(100, 100), (0, 0)], False)])  # fmt: skip
    @example(events=[("sample", [(1000, 1000), (0, 0)], False),
                     ("sample", [(50, 50), (0, 0)], True), ("restart",),
                     ("sample", [(50, 50), (0, 0)], False), ("deliver held", 0),
                     ("sample", [(100, 100), (0, 0)], False)])  # fmt: skip
    def bills_exactly(events: list[tuple]) -> None:
        savepoint = transaction.savepoint()
        try:
            agent = Agent(identity, keys)
            reached.update(run(agent, events, lambda env: ingest_metering(node, env)))

            billed: Counter[str] = Counter()
            for key in JobPeerKey.objects.filter(public_key__in=keys):
                billed[f"{key.public_key} rx"] += key.total_rx_bytes
                billed[f"{key.public_key} tx"] += key.total_tx_bytes
            assert +billed == +agent.counted(), events
            # And each order got its peer's bytes (rx: what the buyer sent, its bytes_out).
            for key, order in zip(
                keys, Order.objects.filter(pk__in=orders).order_by("pk"), strict=True
            ):
                assert (order.bytes_out, order.bytes_in) == (
                    billed[f"{key} rx"],
                    billed[f"{key} tx"],
                )
        finally:
            transaction.savepoint_rollback(savepoint)

    bills_exactly()
    # The run reached the awkward deliveries, not only samples in order.
    if EXAMPLES >= 50:
        paths = (
            "late final",
            "delivered again out of order",
            "restart",
            "held past a later sample",
            "held past the next boot's",
        )
        assert all(reached[path] for path in paths), reached
