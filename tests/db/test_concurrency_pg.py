"""Concurrency on PostgreSQL: real threads, each with its own database connection, racing the
real services. These are the "Done when" figures of issue 2: the whole MOLT range from 8
threads with no duplicate and a 409 at the end; 100 orders against a wallet that covers 10;
and capture racing release on one hold (32 threads, 200 rounds: issue 4).

Every thread closes its connection when it ends (Django opens one per thread), so the test
database can be flushed and dropped afterwards.
"""

from __future__ import annotations

import ipaddress
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.db import connection, transaction
from rest_framework.test import APIClient

from config.celery import app as celery_app
from marketplace import ledger
from marketplace.audit import audit_ledger
from marketplace.errors import AlreadyResolved
from marketplace.listings import create_listing
from marketplace.models import Account, EscrowHold, LedgerEntry, LedgerTransaction, Order
from marketplace.orders import (
    BANDWIDTH_USED_UP,
    add_traffic,
    fail_order,
    place_order,
    provision_order,
    quote_for,
    rekey_order,
)
from marketplace.tokens import issue_api_token
from meshnet import ipplan
from meshnet.agent_channel import acknowledge_revision, ingest_metering
from meshnet.allocation import allocate_address
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.errors import PoolExhausted
from meshnet.models import IpAllocation, IpPool, JobPeerKey, Node
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

MOLT = ipaddress.IPv4Network("10.100.128.0/17")
JOBS = ipaddress.IPv4Network("10.64.0.0/11")  # buyers' job tunnel addresses (ipplan "jobs")


def in_threads(n: int, work: Callable[[int], object], *, threads: int | None = None) -> list:
    """Run work(0..n-1) on `threads` threads (default n) that start together; thread t does
    items t, t + threads, ... Each thread closes its connection when it is done. Exceptions
    propagate to the caller. Results come back in item order."""
    threads = threads or n
    start = threading.Barrier(threads)

    def run(t: int) -> list[tuple[int, object]]:
        try:
            start.wait(timeout=60)
            return [(i, work(i)) for i in range(t, n, threads)]
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        done = [pair for batch in pool.map(run, range(threads)) for pair in batch]
    return [result for _, result in sorted(done, key=lambda pair: pair[0])]


@pytest.fixture
def eager_celery():
    """Provisioning is enqueued on commit; run it in the committing thread instead of sending
    it to a broker where some other worker (on another database) could pick it up."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


# --- (a) the whole MOLT range from 8 threads ------------------------------------------------


def test_eight_threads_allocate_the_whole_molt_range_once_each_then_get_409(provider):
    def allocate_until_exhausted(_: int) -> list[str]:
        mine: list[str] = []
        while True:
            try:
                lease = allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB)
            except PoolExhausted:
                return mine
            mine.append(lease.address)

    per_thread = in_threads(8, allocate_until_exhausted)
    handed_out = [address for addresses in per_thread for address in addresses]

    assert len(handed_out) == 32766
    assert len(set(handed_out)) == 32766, "an address was handed out twice"
    hosts = {str(ip) for ip in MOLT.hosts()}
    assert set(handed_out) == hosts  # every usable host, never network or broadcast
    assert sum(1 for addresses in per_thread if addresses) > 1, "no concurrency happened"
    assert IpAllocation.objects.filter(pool__name=ipplan.MOLT_POOL).count() == 32766
    assert IpPool.objects.get(name=ipplan.MOLT_POOL).next_offset == 32767

    with pytest.raises(PoolExhausted) as err:
        allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB)
    assert err.value.status_code == 409 and err.value.pool_name == "molt"

    # Over HTTP, a node enrolling into the full pool gets the 409 naming the pool, and nothing
    # of the enrolment is kept (the token can still be used once space frees up).
    issued = create_enrollment_token(provider)
    body = factories.enroll_request(Identity.generate(), issued.token)
    response = APIClient().post("/api/v1/nodes/enroll/", body, format="json")
    assert response.status_code == 409, response.content
    assert response.json()["code"] == "pool_exhausted"
    assert "'molt'" in response.json()["detail"]
    assert not Node.objects.exists()
    issued.record.refresh_from_db()
    assert issued.record.used_at is None


# --- (b) 100 concurrent orders against a wallet that covers 10 -------------------------------


def test_a_hundred_concurrent_orders_against_a_wallet_for_ten_place_exactly_ten(
    buyer, provider, eager_celery
):
    # Two nodes of 50 GPUs and one listing per GPU: every order goes to its own listing, so
    # the listing locks do not serialize them and the wallet guard alone decides.
    nodes = [
        factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(50)])
        for _ in range(2)
    ]
    listings = [
        create_listing(provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0)
        for node in nodes
        for _ in range(50)
    ]
    hold = quote_for(listings[0], gpu_count=1, hours=1).total_hold
    assert hold == USD
    ledger.grant_credits(buyer, 10 * hold)
    wallet = ledger.wallet_account(buyer)
    token = issue_api_token(buyer)
    keys = [factories.wg_public_key() for _ in range(100)]

    lowest_seen = [10 * hold]
    done = threading.Event()

    def watch_wallet() -> None:
        try:
            while not done.is_set():
                balance = Account.objects.values_list("balance", flat=True).get(pk=wallet.pk)
                lowest_seen[0] = min(lowest_seen[0], balance)
        finally:
            connection.close()

    watcher = threading.Thread(target=watch_wallet)
    watcher.start()

    def order(i: int) -> tuple[int, str]:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        response = client.post(
            "/api/v1/orders/",
            {
                "listing": listings[i].pk,
                "gpu_count": 1,
                "hours": 1,
                "wireguard_public_key": keys[i],
            },
            format="json",
            HTTP_IDEMPOTENCY_KEY=f"order-{i}-{uuid.uuid4()}",
        )
        return response.status_code, response.json().get("code", "")

    try:
        # PostgreSQL's default max_connections is 100, shared with every other client of the
        # server: 25 threads (one connection each) race through the 100 orders.
        results = in_threads(100, order, threads=25)
    finally:
        done.set()
        watcher.join()

    outcomes = Counter(results)
    assert outcomes == {(201, ""): 10, (402, "insufficient_funds"): 90}, outcomes
    assert Order.objects.filter(buyer=buyer).count() == 10
    assert EscrowHold.objects.filter(state="open").count() == 10
    assert ledger.available_for(buyer) == 0
    assert ledger.held_for(buyer) == 10 * hold
    assert lowest_seen[0] >= 0
    assert Account.objects.filter(balance__lt=0).exclude(kind="world").count() == 0
    assert sum(e.amount for e in LedgerEntry.objects.all()) == 0
    assert audit_ledger() == []
    # Provisioning ran after each commit: every placed order has its own job address.
    placed = Order.objects.filter(buyer=buyer).select_related("job_peer")
    assert {o.state for o in placed} == {"provisioning"}
    addresses = {o.job_peer.address for o in placed}
    assert len(addresses) == 10 and all(ipaddress.IPv4Address(a) in JOBS for a in addresses)


# --- (c) capture racing release on one hold --------------------------------------------------


def test_capture_and_release_racing_on_one_hold_resolve_it_exactly_once(buyer, provider):
    rounds, racers = 200, 32
    # One hold per round, each on a GPU of its own: four nodes of 50 (an agent reports at most
    # 64 GPUs per node).
    listings = [
        create_listing(
            provider,
            node=factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(50)]),
            gpu_count=50,
            price_per_gpu_hour=USD,
            price_per_gib=0,
        )
        for _ in range(rounds // 50)
    ]
    ledger.grant_credits(buyer, rounds * USD)
    holds = [
        place_order(
            buyer,
            listing_id=listings[r % len(listings)].pk,
            gpu_count=1,
            hours=1,
            wireguard_public_key=factories.wg_public_key(),
        ).hold
        for r in range(rounds)
    ]
    assert ledger.available_for(buyer) == 0

    # The racers persist across rounds (one connection each); barriers start every round
    # together and tell the main thread when all have tried.
    go = threading.Barrier(racers + 1)
    tried = threading.Barrier(racers + 1)
    wins: list[list[str]] = [[] for _ in range(rounds)]
    errors: list[BaseException] = []
    capture = 600_000

    def racer(i: int) -> None:
        try:
            for r, hold in enumerate(holds):
                go.wait(timeout=60)
                try:
                    if i % 2:
                        ledger.resolve_hold(
                            hold, captured=capture, fee=60_000, provider=provider, memo="race"
                        )
                        wins[r].append("capture")
                    else:
                        ledger.resolve_hold(hold, captured=0, fee=0, provider=None, memo="race")
                        wins[r].append("release")
                except AlreadyResolved:
                    pass
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)
                tried.wait(timeout=60)
        finally:
            connection.close()

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    try:
        for _ in range(rounds):
            go.wait(timeout=60)
            tried.wait(timeout=60)
    finally:
        for t in threads:
            t.join(timeout=60)

    assert errors == []
    assert [len(w) for w in wins] == [1] * rounds, "a hold was resolved more than once or never"
    captures = sum(1 for w in wins if w == ["capture"])
    for hold, w in zip(holds, wins, strict=True):
        hold.refresh_from_db()
        assert hold.state == {"capture": "captured", "release": "released"}[w[0]]
        assert LedgerTransaction.objects.filter(resolves_hold=hold).count() == 1
    assert ledger.available_for(buyer) == rounds * USD - captures * capture
    assert ledger.earnings_account(provider).balance == captures * (capture - 60_000)
    assert ledger.fees_account().balance == captures * 60_000
    assert audit_ledger() == []


# --- lock order: node, then keys, then order -------------------------------------------------


def one_gpu_order(buyer, provider, *, node=None, key: str | None = None) -> tuple[Node, Order]:
    """A placed order of one GPU for an hour, on `node` (default: a new node of `provider`)."""
    node = node or factories.enrolled_node(provider, gpus=[factories.gpu(0)])
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0
    )
    ledger.grant_credits(buyer, 10 * USD)
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=1,
        wireguard_public_key=key or factories.wg_public_key(),
    )
    return node, order


def race(
    hold: Callable[[], object], then: Callable[[], object], racer: Callable[[], object]
) -> list[BaseException]:
    """Two threads, each with a connection of its own: a transaction takes `hold`'s locks, lets
    `racer` start, and half a second later takes `then`'s. What either raised comes back: a
    deadlock is PostgreSQL aborting one side ("deadlock detected")."""
    holding = threading.Event()
    failures: list[BaseException] = []

    def holder() -> None:
        try:
            with transaction.atomic():
                hold()
                holding.set()
                time.sleep(0.5)
                then()
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    def other() -> None:
        try:
            assert holding.wait(10)
            racer()
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=holder), threading.Thread(target=other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return failures


def test_a_rekey_racing_a_metering_sample_of_the_same_order_does_not_deadlock(
    buyer, provider, eager_celery
):
    node, order = one_gpu_order(buyer, provider)
    order = provision_order(order.pk)
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision)
    key = JobPeerKey.objects.get(job_peer=order.job_peer_id, retired_at__isnull=True)

    failures = race(
        # A transaction that holds the peer's key rows, then takes the order's row (as metering
        # ingestion does, after the node's row), while the re-key comes in between.
        hold=lambda: list(JobPeerKey.objects.select_for_update().filter(pk=key.pk)),
        then=lambda: add_traffic(order.job_peer, rx_bytes=10, tx_bytes=20),
        racer=lambda: rekey_order(order, factories.wg_public_key()),
    )

    assert failures == []
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (10, 20)
    assert order.wireguard_public_key != key.public_key


def test_an_ack_racing_a_metering_sample_of_its_node_does_not_deadlock(
    buyer, provider, eager_celery, settings
):
    # The stored sample's foreign key to the node is checked at commit with a share lock on the
    # node's row; an ack holds that row and then wants the key rows the sample holds. The sample
    # also uses up the bandwidth allowance, so its transaction stops the order (node, order).
    settings.MOLT_BANDWIDTH_ALLOWANCE_GIB = 1
    identity = Identity.generate()
    issued = create_enrollment_token(provider)
    node = enroll_node(
        factories.enroll_request(identity, issued.token, gpus=[factories.gpu(0)]),
        observed_ip=None,
    ).node
    key = factories.wg_public_key()
    _, order = one_gpu_order(buyer, provider, node=node, key=key)
    order = provision_order(order.pk)
    acknowledge_revision(node, Node.objects.get(pk=node.pk).desired_revision)
    over = wire.MeteringSample(
        node_id=identity.node_id,
        boot_id=wire.new_nonce(),
        seq=1,
        sampled_at=int(time.time()),
        peers=(wire.PeerCounters(key, 0, rx_bytes=600 << 20, tx_bytes=600 << 20),),
    )
    envelope = wire.signed_envelope(wire.METERING, over.to_dict(), identity)

    failures = race(
        # acknowledge_revision's locks (and revoke_node's): the node's row, then key rows.
        hold=lambda: Node.objects.select_for_update().get(pk=node.pk),
        then=lambda: list(JobPeerKey.objects.select_for_update().filter(public_key=key)),
        racer=lambda: ingest_metering(node, envelope),  # 1.2 GiB: past the 1 GiB allowance
    )

    assert failures == []
    order.refresh_from_db()
    assert order.state == "stopping" and order.reason == BANDWIDTH_USED_UP
    assert order.bytes_in + order.bytes_out == 1200 << 20


def test_a_provisioning_timeout_racing_the_late_ack_of_its_order_does_not_deadlock(
    buyer, provider, eager_celery
):
    node, order = one_gpu_order(buyer, provider)
    order = provision_order(order.pk)
    assert order.state == "provisioning"

    failures = race(
        # acknowledge_revision's locks: the node's row, then (peer_acknowledged moves the order
        # to running) the order's.
        hold=lambda: Node.objects.select_for_update().get(pk=node.pk),
        then=lambda: list(Order.objects.select_for_update().filter(pk=order.pk)),
        # What expire_orders does to an order still provisioning after the timeout (and a
        # revocation to every live order): fail it, release its hold, drop its peer.
        racer=lambda: fail_order(order, "the provider node did not acknowledge in time"),
    )

    assert failures == []
    order.refresh_from_db()
    assert order.state == "failed"


def test_a_cancel_racing_the_provisioning_of_its_order_does_not_deadlock(buyer, provider):
    node, order = one_gpu_order(buyer, provider)  # no eager Celery: the test provisions it

    failures = race(
        # stop_order's locks: the node's row, then the order's.
        hold=lambda: Node.objects.select_for_update().get(pk=node.pk),
        then=lambda: list(Order.objects.select_for_update().filter(pk=order.pk)),
        racer=lambda: provision_order(order.pk),
    )

    assert failures == []
    assert Order.objects.get(pk=order.pk).state == "provisioning"
