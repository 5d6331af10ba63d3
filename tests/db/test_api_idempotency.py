"""Idempotency-Key on money-moving POSTs (orders, stop): a retry returns the first response byte
for byte and moves nothing; the same key with another body is refused; failures are not
remembered; a concurrent duplicate while the first runs gets 409; a crashed request's claim
expires; keys are kept 24 h. (Top-ups, disputes and payouts: tests/db/test_payments.py.)"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from config.celery import app as celery_app
from marketplace import idempotency, ledger
from marketplace.models import (
    EscrowHold,
    IdempotencyRecord,
    LedgerTransaction,
    Listing,
    Order,
    OrderTransition,
)
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

ORDERS = "/api/v1/orders/"


@pytest.fixture
def buyer_api(api_client_for, buyer):
    ledger.grant_credits(buyer, 100 * USD)
    return api_client_for(buyer)


def order_body(for_listing, **overrides) -> dict:
    return {
        "listing": for_listing.pk,
        "gpu_count": 1,
        "hours": 2,
        "wireguard_public_key": factories.wg_public_key(),
        **overrides,
    }


def post_order(client, body, key: str | None = None, raw: str | None = None):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    data = raw if raw is not None else json.dumps(body)
    return client.post(ORDERS, data, content_type="application/json", **headers)


def test_a_retry_with_the_same_key_returns_the_same_bytes_and_places_one_order(
    buyer_api, buyer, listing
):
    body = order_body(listing)

    first = post_order(buyer_api, body, key="order-1")
    available = ledger.available_for(buyer)
    second = post_order(buyer_api, body, key="order-1")

    assert first.status_code == second.status_code == 201
    assert second.content == first.content
    assert second["Content-Type"] == first["Content-Type"] == "application/json"
    assert second["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert Order.objects.filter(buyer=buyer).count() == 1
    assert EscrowHold.objects.filter(order__buyer=buyer).count() == 1
    assert ledger.available_for(buyer) == available
    record = IdempotencyRecord.objects.get(user=buyer, key="order-1")
    assert record.status_code == 201
    assert record.response_body.encode() == first.content


def test_key_order_and_whitespace_of_the_body_do_not_matter(buyer_api, buyer, listing):
    body = order_body(listing)
    first = post_order(buyer_api, body, key="k")

    reordered = json.dumps(dict(reversed(list(body.items()))), indent=4)
    second = post_order(buyer_api, None, key="k", raw=reordered)

    assert second.status_code == 201
    assert second.content == first.content
    assert Order.objects.filter(buyer=buyer).count() == 1


def test_the_same_key_with_another_body_is_a_422_naming_the_key(buyer_api, buyer, listing):
    post_order(buyer_api, order_body(listing), key="order-7")
    transactions = LedgerTransaction.objects.count()

    response = post_order(buyer_api, order_body(listing, hours=3), key="order-7")

    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_reused"
    assert "'order-7'" in response.json()["detail"]
    assert Order.objects.filter(buyer=buyer).count() == 1
    assert LedgerTransaction.objects.count() == transactions


def test_without_a_key_every_post_places_a_new_order(buyer_api, buyer, listing):
    body = order_body(listing)
    assert post_order(buyer_api, body).status_code == 201
    # Same body, no key: a second order (and so a key already live: refused by the service).
    response = post_order(buyer_api, body)
    assert response.status_code == 400
    assert Order.objects.filter(buyer=buyer).count() == 1
    assert IdempotencyRecord.objects.count() == 0


def test_keys_belong_to_one_user(buyer_api, buyer, api_client_for, stranger, listing):
    ledger.grant_credits(stranger, 100 * USD)
    post_order(buyer_api, order_body(listing), key="shared-key")

    theirs = post_order(api_client_for(stranger), order_body(listing), key="shared-key")

    assert theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert Order.objects.filter(buyer=stranger).count() == 1


def test_a_failed_request_is_not_remembered_so_a_retry_runs_again(
    api_client_for, make_user, listing
):
    poor = make_user("poor")
    ledger.grant_credits(poor, 1 * USD)
    client = api_client_for(poor)
    body = order_body(listing)

    refused = post_order(client, body, key="retry-me")
    assert refused.status_code == 402
    assert IdempotencyRecord.objects.filter(user=poor).count() == 0

    ledger.grant_credits(poor, 100 * USD)
    placed = post_order(client, body, key="retry-me")
    assert placed.status_code == 201
    assert "Idempotent-Replayed" not in placed
    assert Order.objects.filter(buyer=poor).count() == 1


def test_an_invalid_body_with_a_key_is_a_400_and_leaves_the_key_free(buyer_api, buyer, listing):
    response = post_order(buyer_api, order_body(listing, hours=0), key="k1")

    assert response.status_code == 400
    assert "hours" in response.json()
    assert IdempotencyRecord.objects.count() == 0


@pytest.mark.parametrize(
    "key", ["", "x" * 256, "has space", "naïve"], ids=["empty", "long", "space", "non-ascii"]
)
def test_a_malformed_key_is_a_400(buyer_api, listing, key):
    response = post_order(buyer_api, order_body(listing), key=key)

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_idempotency_key"
    assert Order.objects.count() == 0


def test_a_retried_stop_replays_the_first_answer_and_releases_the_hold_once(
    buyer_api, buyer, listing
):
    order_id = post_order(buyer_api, order_body(listing)).json()["id"]
    url = f"{ORDERS}{order_id}/stop/"

    first = buyer_api.post(url, HTTP_IDEMPOTENCY_KEY="stop-1")
    second = buyer_api.post(url, HTTP_IDEMPOTENCY_KEY="stop-1")

    assert first.status_code == second.status_code == 200
    assert second.content == first.content
    assert json.loads(first.content)["state"] == "cancelled"
    assert OrderTransition.objects.filter(order_id=order_id, to_state="cancelled").count() == 1
    assert LedgerTransaction.objects.filter(kind="release").count() == 1
    assert ledger.available_for(buyer) == 100 * USD
    # Without the key the second stop is refused: the order already ended.
    assert buyer_api.post(url).status_code == 409


def test_a_stop_key_reused_for_another_order_is_a_422(buyer_api, listing):
    first_id = post_order(buyer_api, order_body(listing)).json()["id"]
    second_id = post_order(buyer_api, order_body(listing)).json()["id"]
    assert buyer_api.post(f"{ORDERS}{first_id}/stop/", HTTP_IDEMPOTENCY_KEY="s").status_code == 200

    response = buyer_api.post(f"{ORDERS}{second_id}/stop/", HTTP_IDEMPOTENCY_KEY="s")

    assert response.status_code == 422
    assert Order.objects.get(pk=second_id).state == "pending"


# --- a concurrent duplicate (PostgreSQL: real transactions in two threads) -------------------


@pytest.fixture
def eager_provisioning(settings):
    """Committed orders enqueue provisioning: run it in-process (and push desired state into an
    in-memory channel layer) instead of sending tasks to whatever broker the machine has."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def waiting_backends() -> int:
    """Sessions of this test database blocked on a lock (the statistics snapshot is cleared so
    each poll sees the present)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


def wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_concurrent_duplicate_gets_409_while_the_first_runs_and_the_replay_after(
    buyer, listing, eager_provisioning
):
    from marketplace.tokens import issue_api_token

    ledger.grant_credits(buyer, 100 * USD)
    token = issue_api_token(buyer)
    body = json.dumps(order_body(listing))
    responses: dict[str, object] = {}

    def client() -> APIClient:
        c = APIClient()
        c.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        return c

    def send_first() -> None:
        try:
            responses["first"] = post_order(client(), None, key="dup", raw=body)
        except Exception as exc:  # reported by the assertions below
            responses["first"] = exc
        finally:
            connections.close_all()

    first = threading.Thread(target=send_first)
    try:
        # Hold the listing's row lock so the first request stops inside place_order, after its
        # claim on the key committed. The duplicate must not wait for it: 409 at once.
        with transaction.atomic():
            Listing.objects.select_for_update().get(pk=listing.pk)
            first.start()
            wait_for(lambda: waiting_backends() == 1, "the first request to wait on the listing")
            record = IdempotencyRecord.objects.get(user=buyer, key="dup")
            assert record.status_code == 0  # in flight, committed, visible to others
            started = time.monotonic()
            duplicate = post_order(client(), None, key="dup", raw=body)
            waited = time.monotonic() - started
            assert waiting_backends() == 1  # the duplicate never queued behind the first
    finally:
        first.join(timeout=30)

    assert duplicate.status_code == 409, duplicate.content
    assert duplicate.json()["code"] == "idempotency_key_in_flight"
    assert "'dup'" in duplicate.json()["detail"]
    assert waited < 5
    a = responses["first"]
    assert not isinstance(a, Exception), a
    assert a.status_code == 201, a.content
    # Once the first finished, a retry replays it byte for byte.
    replay = post_order(client(), None, key="dup", raw=body)
    assert replay.status_code == 201
    assert replay.content == a.content
    assert replay["Idempotent-Replayed"] == "true"
    assert Order.objects.filter(buyer=buyer).count() == 1
    assert EscrowHold.objects.filter(order__buyer=buyer).count() == 1
    order = Order.objects.get(buyer=buyer)
    assert ledger.available_for(buyer) == 100 * USD - order.hold_amount
    # The committed order was provisioned on commit, as in production.
    assert order.state == "provisioning"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_racing_duplicates_place_one_order(buyer, listing, eager_provisioning):
    """Eight copies of one request at once: one places the order, the others get 409 or the
    replay, and exactly one hold is placed."""
    from marketplace.tokens import issue_api_token

    ledger.grant_credits(buyer, 100 * USD)
    token = issue_api_token(buyer)
    body = json.dumps(order_body(listing))
    start = threading.Barrier(8)
    results: list[tuple[int, bytes]] = []

    def send() -> None:
        try:
            c = APIClient()
            c.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
            start.wait(timeout=30)
            r = post_order(c, None, key="race", raw=body)
            results.append((r.status_code, r.content))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    codes = sorted(code for code, _ in results)
    assert len(codes) == 8 and set(codes) <= {201, 409}, codes
    created = {content for code, content in results if code == 201}
    assert len(created) == 1  # every 201 is the same bytes: the first, or its replay
    assert Order.objects.filter(buyer=buyer).count() == 1
    assert EscrowHold.objects.filter(order__buyer=buyer).count() == 1


# --- a crashed request, a stale claim taken over, and the 24 h retention ---------------------


def fingerprint_of(raw: str) -> str:
    """The fingerprint the decorator computes for POST /api/v1/orders/ with body `raw`."""
    from rest_framework.parsers import JSONParser
    from rest_framework.request import Request
    from rest_framework.test import APIRequestFactory

    from marketplace.api.idempotency import request_fingerprint

    wsgi = APIRequestFactory().post(ORDERS, raw, content_type="application/json")
    return request_fingerprint(Request(wsgi, parsers=[JSONParser()]))


def test_a_crashed_requests_claim_blocks_retries_until_it_expires_then_one_runs(
    buyer_api, buyer, listing, settings
):
    from marketplace.api.idempotency import _claim

    raw = json.dumps(order_body(listing))
    # Phase 1 of a request whose process then died: the claim committed, the work never did.
    record, claimed = _claim(buyer, "crashed", fingerprint_of(raw), "dead-process-token")
    assert claimed and record.status_code == 0

    retry = post_order(buyer_api, None, key="crashed", raw=raw)
    assert retry.status_code == 409
    assert retry.json()["code"] == "idempotency_key_in_flight"
    assert Order.objects.filter(buyer=buyer).count() == 0

    stale = timedelta(seconds=settings.MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS + 1)
    IdempotencyRecord.objects.filter(pk=record.pk).update(claimed_at=timezone.now() - stale)
    taken_over = post_order(buyer_api, None, key="crashed", raw=raw)
    assert taken_over.status_code == 201, taken_over.content
    assert "Idempotent-Replayed" not in taken_over
    again = post_order(buyer_api, None, key="crashed", raw=raw)
    assert again.content == taken_over.content and again["Idempotent-Replayed"] == "true"
    assert Order.objects.filter(buyer=buyer).count() == 1
    record.refresh_from_db()
    assert (record.status_code, record.claim) == (201, "")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_claim_whose_holder_is_gone_is_taken_over_after_the_grace_not_the_timeout(
    buyer_api, buyer, listing, settings
):
    """A request whose process died (or whose connection was cut while the database was out of
    reach, so it could not free its claim) holds no work lock: the first retry past
    HOLD_GRACE runs, long before MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS."""
    from marketplace.api.idempotency import _claim

    raw = json.dumps(order_body(listing))
    record, claimed = _claim(buyer, "gone", fingerprint_of(raw), "dead-process-token")
    assert claimed
    # Within the grace the claim may be between its commit and its work's lock: 409.
    assert post_order(buyer_api, None, key="gone", raw=raw).status_code == 409
    past_grace = idempotency.HOLD_GRACE + timedelta(seconds=1)
    assert past_grace.total_seconds() < settings.MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS
    IdempotencyRecord.objects.filter(pk=record.pk).update(claimed_at=timezone.now() - past_grace)

    taken_over = post_order(buyer_api, None, key="gone", raw=raw)

    assert taken_over.status_code == 201, taken_over.content
    assert Order.objects.filter(buyer=buyer).count() == 1
    record.refresh_from_db()
    assert (record.status_code, record.claim) == (201, "")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_claim_whose_work_still_runs_is_not_taken_over_past_the_grace(buyer_api, buyer, listing):
    """The same claim while a transaction holds its work's lock (as `_keyed` does for as long
    as the work runs) is in flight: 409, however long past the grace, until the timeout."""
    from marketplace.api.idempotency import _claim

    raw = json.dumps(order_body(listing))
    record, _ = _claim(buyer, "busy", fingerprint_of(raw), "working-token")
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        claimed_at=timezone.now() - idempotency.HOLD_GRACE - timedelta(seconds=1)
    )
    holding, release = threading.Event(), threading.Event()

    def work() -> None:
        try:
            with transaction.atomic():
                idempotency.hold(record)
                holding.set()
                release.wait(timeout=30)
        finally:
            connections.close_all()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert holding.wait(timeout=15)
        retry = post_order(buyer_api, None, key="busy", raw=raw)
    finally:
        release.set()
        worker.join(timeout=30)

    assert retry.status_code == 409, retry.content
    assert retry.json()["code"] == "idempotency_key_in_flight"
    assert Order.objects.filter(buyer=buyer).count() == 0
    # Once that transaction ended without storing (a holder that died the same way), the next
    # retry takes the claim over.
    assert post_order(buyer_api, None, key="busy", raw=raw).status_code == 201


def test_a_stale_claim_with_another_body_is_still_a_422(buyer_api, buyer, listing):
    from marketplace.api.idempotency import _claim

    record, _ = _claim(buyer, "k", fingerprint_of(json.dumps(order_body(listing))), "dead")
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        claimed_at=timezone.now() - timedelta(days=1)
    )

    response = post_order(buyer_api, order_body(listing), key="k")

    assert response.status_code == 422
    assert Order.objects.count() == 0


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_slow_request_whose_claim_was_taken_over_rolls_its_work_back(
    buyer, listing, eager_provisioning
):
    """The first request is not dead but stuck past the in-flight timeout; a retry takes the
    claim over. Both then run: the first's final compare-and-set finds the other's token, so
    its order is rolled back and it answers 409. One order, one hold."""
    from marketplace.tokens import issue_api_token

    ledger.grant_credits(buyer, 100 * USD)
    token = issue_api_token(buyer)
    raw = json.dumps(order_body(listing))
    responses: dict[str, object] = {}

    def send(name: str) -> None:
        c = APIClient()
        c.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        try:
            responses[name] = post_order(c, None, key="slow", raw=raw)
        except Exception as exc:  # reported by the assertions below
            responses[name] = exc
        finally:
            connections.close_all()

    first = threading.Thread(target=send, args=("first",))
    retry = threading.Thread(target=send, args=("retry",))
    try:
        with transaction.atomic():
            Listing.objects.select_for_update().get(pk=listing.pk)
            first.start()
            wait_for(lambda: waiting_backends() == 1, "the first request to wait on the listing")
            IdempotencyRecord.objects.filter(key="slow").update(
                claimed_at=timezone.now() - timedelta(hours=1)
            )
            retry.start()
            wait_for(lambda: waiting_backends() == 2, "the retry to take over and wait too")
    finally:
        first.join(timeout=30)
        retry.join(timeout=30)

    a, b = responses["first"], responses["retry"]
    assert not isinstance(a, Exception), a
    assert not isinstance(b, Exception), b
    assert (a.status_code, b.status_code) == (409, 201), (a.content, b.content)
    assert Order.objects.filter(buyer=buyer).count() == 1
    assert EscrowHold.objects.filter(order__buyer=buyer).count() == 1
    order = Order.objects.get(buyer=buyer)
    assert ledger.available_for(buyer) == 100 * USD - order.hold_amount
    assert json.loads(b.content)["id"] == order.pk


def test_keys_are_kept_at_least_a_day_then_purged(buyer_api, buyer, listing, settings):
    from marketplace.idempotency import purge_expired_keys

    assert settings.MOLT_IDEMPOTENCY_KEY_TTL_SECONDS >= 24 * 3600
    body = order_body(listing)
    first = post_order(buyer_api, body, key="day-old")
    record = IdempotencyRecord.objects.get(user=buyer, key="day-old")
    now = timezone.now()

    IdempotencyRecord.objects.filter(pk=record.pk).update(
        created_at=now - timedelta(hours=23, minutes=59)
    )
    assert purge_expired_keys(now=now) == 0
    replay = post_order(buyer_api, body, key="day-old")
    assert replay.content == first.content and replay["Idempotent-Replayed"] == "true"

    IdempotencyRecord.objects.filter(pk=record.pk).update(
        created_at=now - timedelta(hours=24, seconds=1)
    )
    assert purge_expired_keys(now=now) == 1
    assert not IdempotencyRecord.objects.filter(pk=record.pk).exists()


def test_the_ttl_setting_refuses_less_than_a_day():
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=REPO,
        env={
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DJANGO_DEBUG": "true",
            "MOLT_IDEMPOTENCY_KEY_TTL_SECONDS": "3600",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "MOLT_IDEMPOTENCY_KEY_TTL_SECONDS=3600 must be at least 86400" in result.stderr
