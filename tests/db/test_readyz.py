"""/readyz/ says whether the gateway can do its work: its database and its broker (issue 15 item
2: with Redis down, /healthz/ said ok while writes committed and then answered 500)."""

from __future__ import annotations

import pytest

from tests.ports import unused_port

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def closed_port() -> int:
    return unused_port()  # nothing listens there


def test_ready_when_the_database_and_the_broker_answer(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"

    response = client.get("/readyz/")

    assert response.status_code == 200
    assert response.json() == {"ready": True, "database": "ok", "broker": "ok"}


def test_a_broker_that_does_not_answer_is_a_503_naming_it(client, settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/0"

    response = client.get("/readyz/")

    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False and body["database"] == "ok"
    assert body["broker"].startswith("unreachable")
    assert "127.0.0.1" not in body["broker"]  # no address or URL in the answer


def test_healthz_stays_a_liveness_probe(client, settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/0"

    assert client.get("/healthz/").content == b"ok"
