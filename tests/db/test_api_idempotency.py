"""Idempotency-Key on money-moving POSTs (orders, stop): a retry returns the first response byte
for byte and moves nothing; the same key with another body is refused; failures are not
remembered; a concurrent duplicate waits for the first and replays it."""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.db import connection, connections, transaction
from rest_framework.test import APIClient

from config.celery import app as celery_app
from marketplace import ledger, services
from marketplace.models import (
    EscrowHold,
    IdempotencyRecord,
    LedgerTransaction,
    Listing,
    Order,
    OrderTransition,
)
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

USD = 1_000_000
ORDERS = "/api/v1/orders/"


@pytest.fixture
def listing(provider):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(i) for i in range(4)])
    return services.create_listing(
        provider, node=node, gpu_count=4, price_per_gpu_hour=2 * USD, price_per_gib=10_000
    )


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
def test_a_concurrent_duplicate_waits_for_the_first_and_replays_it(
    buyer, listing, eager_provisioning
):
    from marketplace.services import issue_api_token

    ledger.grant_credits(buyer, 100 * USD)
    token = issue_api_token(buyer)
    body = json.dumps(order_body(listing))
    responses: dict[str, object] = {}

    def send(name: str) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        try:
            responses[name] = post_order(client, None, key="dup", raw=body)
        except Exception as exc:  # reported by the assertions below
            responses[name] = exc
        finally:
            connections.close_all()

    first = threading.Thread(target=send, args=("first",))
    second = threading.Thread(target=send, args=("second",))
    try:
        # Hold the listing's row lock so the first request stops inside place_order, after it
        # has claimed the key; the second then blocks on the key's unique index.
        with transaction.atomic():
            Listing.objects.select_for_update().get(pk=listing.pk)
            first.start()
            wait_for(lambda: waiting_backends() == 1, "the first request to wait on the listing")
            second.start()
            wait_for(lambda: waiting_backends() == 2, "the second request to wait on the key")
    finally:
        first.join(timeout=30)
        second.join(timeout=30)

    a, b = responses["first"], responses["second"]
    assert not isinstance(a, Exception), a
    assert not isinstance(b, Exception), b
    assert (a.status_code, b.status_code) == (201, 201), (a.content, b.content)
    assert b.content == a.content
    assert b["Idempotent-Replayed"] == "true"
    assert Order.objects.filter(buyer=buyer).count() == 1
    assert EscrowHold.objects.filter(order__buyer=buyer).count() == 1
    order = Order.objects.get(buyer=buyer)
    assert ledger.available_for(buyer) == 100 * USD - order.hold_amount
    # The committed order was provisioned on commit, as in production.
    assert order.state == "provisioning"
