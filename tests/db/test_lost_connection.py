"""A PostgreSQL connection that dies under a write (issue 15: the faults tier's storm): the
backend terminated mid-transaction, or during COMMIT after the commit landed (the client sees a
dead connection for a write that happened). Each case with the real database: the termination
is a real pg_terminate_backend of the request's own backend from a second connection; only the
"COMMIT landed, its answer lost" case raises the error itself, after the real commit and the
real termination, since a signal cannot be aimed between the two.

What must hold: a write that committed answers its 2xx (the outcome re-read on a new
connection), one that did not answers 503 `unavailable`, and a retry with the same
Idempotency-Key is answered at once (the original response, or the write done now), never 409
for the minute a dead request's claim would otherwise stay in flight."""

from __future__ import annotations

import contextlib
import json

import psycopg
import pytest
from django.db import DatabaseError, connection, connections

from config.celery import app as celery_app
from marketplace import ledger
from marketplace.models import EscrowHold, IdempotencyRecord, Order
from marketplace.signals import order_placed
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ORDERS = "/api/v1/orders/"


@pytest.fixture(autouse=True)
def connection_replaced_after(transactional_db):
    """A test that fails may leave this thread's connection dead; the next test (and the flush
    after this one) gets a new one."""
    yield
    with contextlib.suppress(DatabaseError):
        connection.close()


@pytest.fixture
def buyer_api(api_client_for, buyer):
    ledger.grant_credits(buyer, 100 * USD)
    return api_client_for(buyer)


@pytest.fixture
def eager_provisioning(settings):
    """Committed orders enqueue provisioning: run it in-process (and push desired state into an
    in-memory channel layer), so a test sees whether the commit's callbacks ran."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def terminate(pid: int) -> None:
    """pg_terminate_backend from a connection of its own, waiting until the backend is gone
    (PostgreSQL 14+), as an operator or a failover would end it."""
    params = connection.settings_dict
    with psycopg.connect(
        dbname=params["NAME"],
        user=params["USER"],
        password=params["PASSWORD"] or None,
        host=params["HOST"] or None,
        port=params["PORT"] or None,
        autocommit=True,
    ) as other:
        assert other.execute("SELECT pg_terminate_backend(%s, 10000)", [pid]).fetchone()[0]


def own_pid() -> int:
    return connection.connection.info.backend_pid


def post_order(client, body: dict, key: str | None = None):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post(ORDERS, json.dumps(body), content_type="application/json", **headers)


def order_body(listing) -> dict:
    return {
        "listing": listing.pk,
        "gpu_count": 1,
        "hours": 1,
        "wireguard_public_key": factories.wg_public_key(),
    }


@pytest.fixture
def terminated_mid_order():
    """The request's backend is terminated inside place_order's transaction, once: the order
    and its hold are written, the hold's ledger rows are not, and nothing commits."""
    fired = []

    def cut(sender, order, **kwargs) -> None:
        if not fired:
            fired.append(order.pk)
            terminate(own_pid())

    order_placed.connect(cut, dispatch_uid="test-lost-connection")
    yield fired
    order_placed.disconnect(dispatch_uid="test-lost-connection")


@pytest.fixture
def lose_next_commit_answer(monkeypatch):
    """Arms the cut: the next COMMIT (after `after` others) lands, then the backend is terminated
    before its answer reaches the client, which sees the error psycopg raises for a connection
    the server closed. Returns the list the cut appends to when it fired."""
    fired: list[bool] = []
    skipped: list[bool] = []
    wrapper = type(connections["default"])
    real_commit = wrapper._commit

    def commit(self):
        if fired or len(skipped) < skip:
            skipped.append(True)
            return real_commit(self)
        fired.append(True)
        real_commit(self)
        terminate(own_pid())
        with self.wrap_database_errors:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    skip = 0

    def arm(*, after: int = 0) -> list[bool]:
        nonlocal skip
        skip = after
        monkeypatch.setattr(wrapper, "_commit", commit)
        return fired

    return arm


@pytest.mark.parametrize("key", [None, "lost-1"])
def test_a_write_cut_before_commit_is_a_503_and_nothing_of_it_stays(
    buyer_api, buyer, listing, terminated_mid_order, key
):
    response = post_order(buyer_api, order_body(listing), key=key)

    assert terminated_mid_order, "the backend was never terminated"
    assert response.status_code == 503, response.content
    assert response.json()["code"] == "unavailable"
    assert Order.objects.count() == 0
    assert EscrowHold.objects.count() == 0
    assert ledger.available_for(buyer) == 100 * USD
    # The key's claim is not left in flight: the retry is not held off for a minute.
    assert not IdempotencyRecord.objects.filter(user=buyer).exists()


def test_a_retry_after_a_503_runs_the_write_now_not_409(
    buyer_api, buyer, listing, terminated_mid_order
):
    body = order_body(listing)
    cut = post_order(buyer_api, body, key="retry-after-cut")
    assert cut.status_code == 503, cut.content

    retry = post_order(buyer_api, body, key="retry-after-cut")

    assert retry.status_code == 201, retry.content
    assert "Idempotent-Replayed" not in retry
    assert Order.objects.filter(buyer=buyer).count() == 1
    replay = post_order(buyer_api, body, key="retry-after-cut")
    assert replay.status_code == 201 and replay.content == retry.content


# With a key, the first COMMIT is the key's claim's; the order's is the second.
@pytest.mark.parametrize(("key", "commits_before"), [(None, 0), ("commit-lost", 1)])
def test_an_order_whose_commit_landed_but_whose_answer_was_lost_answers_201(
    buyer_api, buyer, listing, lose_next_commit_answer, key, commits_before, eager_provisioning
):
    body = order_body(listing)
    commit_answer_lost = lose_next_commit_answer(after=commits_before)

    response = post_order(buyer_api, body, key=key)

    assert commit_answer_lost, "no COMMIT was cut"
    assert response.status_code == 201, response.content
    order = Order.objects.get(buyer=buyer)
    assert response.json()["id"] == order.pk
    assert response.json()["wireguard_public_key"] == body["wireguard_public_key"]
    assert EscrowHold.objects.filter(order=order).count() == 1
    # What its commit enqueues ran although Django dropped it with the dead connection.
    assert order.state == "provisioning"
    if key is not None:
        # The stored response is the one the client got, and a retry replays it.
        retry = post_order(buyer_api, body, key=key)
        assert retry.status_code == 201 and retry.content == response.content
        assert retry["Idempotent-Replayed"] == "true"
        assert Order.objects.filter(buyer=buyer).count() == 1


def test_a_stop_whose_commit_landed_but_whose_answer_was_lost_answers_200(
    buyer_api, buyer, listing, lose_next_commit_answer
):
    placed = post_order(buyer_api, order_body(listing))
    assert placed.status_code == 201, placed.content
    order_id = placed.json()["id"]
    fired = lose_next_commit_answer()

    response = buyer_api.post(f"{ORDERS}{order_id}/stop/")

    assert fired, "no COMMIT was cut"
    assert response.status_code == 200, response.content
    assert Order.objects.get(pk=order_id).state in ("cancelled", "stopping")
    assert response.json()["state"] == Order.objects.get(pk=order_id).state


def test_a_claim_whose_commit_landed_but_whose_answer_was_lost_does_not_hold_the_key(
    buyer_api, buyer, listing, lose_next_commit_answer
):
    body = order_body(listing)
    fired = lose_next_commit_answer()  # the key's claim commits, its answer is lost

    response = post_order(buyer_api, body, key="claim-lost")

    assert fired, "no COMMIT was cut"
    if response.status_code == 503:
        # Refused: then nothing of it stays, and the retry runs it now.
        assert Order.objects.count() == 0
        response = post_order(buyer_api, body, key="claim-lost")
    assert response.status_code == 201, response.content
    assert Order.objects.filter(buyer=buyer).count() == 1
    replay = post_order(buyer_api, body, key="claim-lost")
    assert replay.status_code == 201 and replay.content == response.content
