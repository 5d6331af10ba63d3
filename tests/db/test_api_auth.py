"""Authentication of the API: tokens from username and password, Bearer tokens, sessions with
CSRF, and 401 for anybody who is not signed in, on every endpoint."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from marketplace.models import ApiToken

pytestmark = [pytest.mark.db, pytest.mark.django_db]

TOKEN_URL = "/api/v1/auth/token/"

# Every endpoint that needs a signed-in user (ids need not exist: auth is checked first).
PROTECTED = [
    ("post", "/api/v1/enrollment-tokens/"),
    ("get", "/api/v1/nodes/"),
    ("get", "/api/v1/nodes/1/"),
    ("get", "/api/v1/listings/"),
    ("post", "/api/v1/listings/"),
    ("get", "/api/v1/listings/1/"),
    ("patch", "/api/v1/listings/1/"),
    ("delete", "/api/v1/listings/1/"),
    ("get", "/api/v1/orders/"),
    ("post", "/api/v1/orders/"),
    ("get", "/api/v1/orders/1/"),
    ("get", "/api/v1/orders/1/wireguard.conf"),
    ("post", "/api/v1/orders/1/stop/"),
    ("get", "/api/v1/wallet/"),
]


def test_right_credentials_get_a_token_that_works(buyer):
    client = APIClient()

    response = client.post(
        TOKEN_URL, {"username": "alice", "password": "alice-pass-123"}, format="json"
    )

    assert response.status_code == 201
    token = response.json()["token"]
    assert token.startswith("molt_")
    assert ApiToken.objects.filter(user=buyer).count() == 1
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert client.get("/api/v1/wallet/").status_code == 200


def test_a_wrong_password_is_a_400_with_a_clear_message_and_no_token(buyer):
    response = APIClient().post(TOKEN_URL, {"username": "alice", "password": "nope"}, format="json")

    assert response.status_code == 400
    assert response.json() == {
        "detail": "unable to log in: wrong username or password",
        "code": "invalid",
        "non_field_errors": ["unable to log in: wrong username or password"],
    }
    assert ApiToken.objects.count() == 0


def test_an_unknown_user_gets_the_same_answer_as_a_wrong_password(buyer):
    response = APIClient().post(TOKEN_URL, {"username": "nobody", "password": "x"}, format="json")

    assert response.status_code == 400
    assert response.json() == {
        "detail": "unable to log in: wrong username or password",
        "code": "invalid",
        "non_field_errors": ["unable to log in: wrong username or password"],
    }


def test_a_deactivated_user_gets_no_token(buyer):
    buyer.is_active = False
    buyer.save()

    response = APIClient().post(
        TOKEN_URL, {"username": "alice", "password": "alice-pass-123"}, format="json"
    )

    assert response.status_code == 400
    assert ApiToken.objects.count() == 0


def test_missing_credentials_name_the_fields(db):
    response = APIClient().post(TOKEN_URL, {}, format="json")

    assert response.status_code == 400
    assert set(response.json()) == {"detail", "code", "username", "password"}


@pytest.mark.parametrize(("method", "url"), PROTECTED, ids=[f"{m} {u}" for m, u in PROTECTED])
def test_anonymous_requests_get_401(db, method, url):
    response = getattr(APIClient(), method)(url)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json()["code"] == "not_authenticated"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer molt_this-token-was-never-issued",
        "Bearer not-a-molt-token",
        "Bearer",
        "Bearer molt_a molt_b",
    ],
    ids=["unknown", "not-molt", "empty", "two-values"],
)
def test_a_bad_token_is_refused(buyer, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    response = client.get("/api/v1/wallet/")

    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"


def test_a_revoked_token_stops_working(buyer, api_client_for):
    client = api_client_for(buyer)
    assert client.get("/api/v1/wallet/").status_code == 200

    ApiToken.objects.filter(user=buyer).delete()

    assert client.get("/api/v1/wallet/").status_code == 401


def test_a_token_of_a_deactivated_user_stops_working(buyer, api_client_for):
    client = api_client_for(buyer)
    buyer.is_active = False
    buyer.save()

    assert client.get("/api/v1/wallet/").status_code == 401


def test_a_browser_session_works_and_its_writes_need_the_csrf_token(buyer):
    browser = APIClient(enforce_csrf_checks=True)
    assert browser.login(username="alice", password="alice-pass-123")

    assert browser.get("/api/v1/wallet/").status_code == 200
    forged = browser.post("/api/v1/enrollment-tokens/")
    assert forged.status_code == 403
    assert "CSRF" in forged.json()["detail"]
