"""Redis out of reach where a request needs the cache (the log-in guard's and the throttles'
counts): every log-in surface answers 503 with Retry-After, never 500, and does nothing: no
token issued, no session opened, no account made (issue 15, finding 2: `auth/token/` answered
500 with Redis stopped). marketplace.api.errors for the API, frontend/unavailable.py for pages."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from marketplace.models import ApiToken
from tests.ports import unused_port

pytestmark = [pytest.mark.db, pytest.mark.django_db]


@pytest.fixture
def cache_down(settings):
    """The cache at a port where nothing listens (connection refused at once)."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{unused_port()}/0",
        }
    }


def test_an_api_token_request_answers_503_unavailable_and_issues_nothing(client, buyer, cache_down):
    response = client.post(
        "/api/v1/auth/token/",
        {"username": "alice", "password": "alice-pass-123"},
        content_type="application/json",
    )

    assert response.status_code == 503, response.content
    assert response.json()["code"] == "unavailable"
    assert response["Retry-After"] == "5"
    assert not ApiToken.objects.exists()


def test_an_enrolment_answers_503_not_500(client, cache_down):
    response = client.post("/api/v1/nodes/enroll/", {}, content_type="application/json")

    assert response.status_code == 503, response.content
    assert response.json()["code"] == "unavailable"


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/accounts/login/", {"username": "alice", "password": "alice-pass-123"}),
        ("/admin/login/", {"username": "alice", "password": "alice-pass-123"}),
        (
            "/accounts/signup/",
            {
                "username": "newcomer",
                "password1": "a-long-pass-123",
                "password2": "a-long-pass-123",
            },
        ),
    ],
)
def test_the_log_in_and_sign_up_pages_answer_503_and_do_nothing(
    client, buyer, cache_down, path, form
):
    response = client.post(path, form)

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert "try again in a few seconds" in response.content.decode()
    assert "_auth_user_id" not in client.session
    assert not get_user_model().objects.filter(username="newcomer").exists()
