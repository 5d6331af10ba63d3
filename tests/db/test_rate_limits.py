"""Rate limits on the calls that take a credential with no account behind them: the API token
exchange, node enrolment and the browser's log-in form, each counted per client address in
the shared (Redis) cache."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

pytestmark = [pytest.mark.db, pytest.mark.django_db]

TOKEN_URL = "/api/v1/auth/token/"
ENROLL_URL = "/api/v1/nodes/enroll/"
LOGIN_URL = "/accounts/login/"


def wrong_password(client: APIClient, address: str):
    return client.post(
        TOKEN_URL,
        {"username": "alice", "password": "not-it"},
        format="json",
        REMOTE_ADDR=address,
    )


def test_token_exchange_is_limited_per_address_with_retry_after(buyer):
    client = APIClient()
    for _ in range(10):
        assert wrong_password(client, "203.0.113.7").status_code == 400

    refused = wrong_password(client, "203.0.113.7")
    right_password_too = client.post(
        TOKEN_URL,
        {"username": "alice", "password": "alice-pass-123"},
        format="json",
        REMOTE_ADDR="203.0.113.7",
    )

    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled"
    assert int(refused["Retry-After"]) > 0
    # The limit refuses before any password is checked, right ones included.
    assert right_password_too.status_code == 429
    # Another address is not held up by the first one's guesses.
    other = client.post(
        TOKEN_URL,
        {"username": "alice", "password": "alice-pass-123"},
        format="json",
        REMOTE_ADDR="203.0.113.8",
    )
    assert other.status_code == 201


def test_a_forged_forwarded_for_header_does_not_reset_the_count(buyer):
    client = APIClient()
    for n in range(11):
        response = client.post(
            TOKEN_URL,
            {"username": "alice", "password": "not-it"},
            format="json",
            REMOTE_ADDR="203.0.113.9",
            HTTP_X_FORWARDED_FOR=f"198.51.100.{n}",
        )
    assert response.status_code == 429


def test_enrolment_is_limited_per_address_before_the_body_is_read():
    client = APIClient()
    statuses = [
        client.post(ENROLL_URL, {"garbage": True}, format="json", REMOTE_ADDR="203.0.113.20")
        for _ in range(61)
    ]
    assert {s.status_code for s in statuses[:60]} == {400}
    assert statuses[60].status_code == 429
    assert "throttled" in statuses[60].json()["code"]
    fresh = client.post(ENROLL_URL, {"garbage": True}, format="json", REMOTE_ADDR="203.0.113.21")
    assert fresh.status_code == 400


def log_in(client: Client, password: str, address: str):
    return client.post(LOGIN_URL, {"username": "alice", "password": password}, REMOTE_ADDR=address)


def test_login_form_stops_checking_passwords_after_ten_failures(buyer):
    client = Client()
    for _ in range(10):
        response = log_in(client, "not-it", "203.0.113.30")
        assert response.status_code == 200
        assert b"Please enter a correct username and password" in response.content

    refused = log_in(client, "alice-pass-123", "203.0.113.30")

    assert refused.status_code == 200
    assert b"Too many failed log-ins" in refused.content
    assert "_auth_user_id" not in client.session
    # The same person from another address logs in.
    elsewhere = log_in(Client(), "alice-pass-123", "203.0.113.31")
    assert elsewhere.status_code == 302


def test_successful_log_ins_are_never_counted(buyer):
    for _ in range(15):
        response = log_in(Client(), "alice-pass-123", "203.0.113.40")
        assert response.status_code == 302


# -- one guard for every password form: per account, per address, both ------------------------


def test_the_admin_log_in_is_behind_the_same_guard(make_user):
    make_user("operator", is_staff=True, is_superuser=True)
    for _ in range(10):
        response = Client().post(
            "/admin/login/",
            {"username": "operator", "password": "guess"},
            REMOTE_ADDR="203.0.113.50",
        )
        assert response.status_code == 200

    client = Client()
    refused = client.post(
        "/admin/login/",
        {"username": "operator", "password": "operator-pass-123"},
        REMOTE_ADDR="203.0.113.50",
    )

    assert refused.status_code == 200
    assert b"Too many failed log-ins" in refused.content
    assert "_auth_user_id" not in client.session


def test_one_guesser_behind_a_nat_does_not_lock_out_the_others(buyer, provider):
    for _ in range(10):
        log_in(Client(), "not-it", "203.0.113.60")
    # alice is held up from that address; bob, behind the same NAT, logs in.
    assert b"Too many failed log-ins" in log_in(Client(), "alice-pass-123", "203.0.113.60").content
    bob = Client().post(
        LOGIN_URL, {"username": "bob", "password": "bob-pass-123"}, REMOTE_ADDR="203.0.113.60"
    )
    assert bob.status_code == 302


def test_guessing_one_account_from_many_addresses_is_stopped(buyer, settings):
    settings.MOLT_LOGIN_FAILURES_PER_ACCOUNT = 3
    for n in range(3):
        wrong_password(APIClient(), f"198.51.100.{n}")

    refused = APIClient().post(
        TOKEN_URL,
        {"username": "alice", "password": "alice-pass-123"},
        format="json",
        REMOTE_ADDR="198.51.100.99",
    )

    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled"
    assert "Too many failed log-ins" in refused.json()["detail"]


def test_one_address_trying_many_accounts_is_stopped(buyer, provider, settings):
    settings.MOLT_LOGIN_FAILURES_PER_ADDRESS = 3
    for name in ("carol", "dave", "erin"):
        Client().post(LOGIN_URL, {"username": name, "password": "x"}, REMOTE_ADDR="203.0.113.70")

    refused = Client().post(
        LOGIN_URL, {"username": "bob", "password": "bob-pass-123"}, REMOTE_ADDR="203.0.113.70"
    )

    assert b"Too many failed log-ins" in refused.content
    assert log_in(Client(), "alice-pass-123", "203.0.113.71").status_code == 302


def test_sign_up_is_limited_per_address(settings, django_user_model):
    settings.MOLT_SIGNUPS_PER_ADDRESS = 2

    def sign_up(name: str, address: str):
        password = "a-long-enough-password-9"
        return Client().post(
            "/accounts/signup/",
            {"username": name, "password1": password, "password2": password},
            REMOTE_ADDR=address,
        )

    assert sign_up("new1", "203.0.113.80").status_code == 302
    assert sign_up("new2", "203.0.113.80").status_code == 302
    refused = sign_up("new3", "203.0.113.80")

    assert refused.status_code == 200
    assert b"Too many new accounts from your address" in refused.content
    assert not django_user_model.objects.filter(username="new3").exists()
    assert sign_up("new4", "203.0.113.81").status_code == 302


def test_the_password_change_counts_wrong_old_passwords_like_log_ins(client, buyer):
    """The password change checks the old password: a stolen session must not guess it
    without limit. Wrong guesses count in the log-in guard (per account and address); once it
    is full, even the right old password is not checked."""
    from meshnet.throttling import LoginGuard

    client.force_login(buyer)
    guard = LoginGuard("127.0.0.1", "alice")
    limit = guard.windows[0].limit
    change = {"new_password1": "a-new-pass-456", "new_password2": "a-new-pass-456"}
    for _ in range(limit):
        wrong = client.post("/accounts/password/", {"old_password": "not-it", **change})
        assert wrong.status_code == 200  # the form again, with its error

    right = client.post("/accounts/password/", {"old_password": "alice-pass-123", **change})

    assert right.status_code == 200
    assert "failed log-ins" in right.content.decode()
    buyer.refresh_from_db()
    assert buyer.check_password("alice-pass-123")


def test_asking_for_ones_address_shares_the_enrolment_limit():
    """`GET nodes/address/` needs no credential; `clawnode join` calls it once before it
    enrols, so it counts in the same per-address budget as enrolment."""
    client = APIClient()
    for _ in range(30):
        assert client.get("/api/v1/nodes/address/", REMOTE_ADDR="203.0.113.22").status_code == 200
    statuses = [
        client.post(ENROLL_URL, {"garbage": True}, format="json", REMOTE_ADDR="203.0.113.22")
        for _ in range(31)
    ]
    assert statuses[29].status_code == 400
    assert statuses[30].status_code == 429
