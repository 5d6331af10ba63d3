"""Staff accounts' second factor (frontend/staff_otp.py, docs/security.md): no admin page and
no ops dashboard without a TOTP code; a wrong code is refused and counted by the log-in guard;
a staff member without a device enrols one first; non-staff accounts are never asked."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.test import Client
from django_otp.plugins.otp_totp.models import TOTPDevice

from meshnet.throttling import LoginGuard
from tests.factories import staff_login, totp_code

pytestmark = pytest.mark.db

ADMIN_PAGES = ["/admin/", "/admin/auth/user/", "/admin/marketplace/", "/ops/"]


@pytest.fixture(autouse=True)
def _fresh_counts():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def operator(make_user):
    return make_user("opal", is_staff=True, is_superuser=True)


@pytest.fixture
def device(operator):
    return TOTPDevice.objects.create(user=operator, name="phone", confirmed=True)


def _admin_login(client, code: str):
    return client.post(
        "/admin/login/?next=/admin/",
        {"username": "opal", "password": "opal-pass-123", "otp_token": code, "next": "/admin/"},
    )


@pytest.mark.parametrize("path", ADMIN_PAGES)
def test_a_staff_session_without_a_code_reaches_no_admin_page(client, operator, device, path):
    client.force_login(operator)  # the password only, as the site's own log-in form gives

    answer = client.get(path)

    assert answer.status_code == 302
    assert answer["Location"].startswith("/admin/login/")


@pytest.mark.parametrize("path", ADMIN_PAGES)
def test_a_staff_member_without_a_device_is_sent_to_enrol(client, operator, path):
    client.force_login(operator)

    answer = client.get(path)

    assert answer.status_code == 302
    assert answer["Location"].startswith("/accounts/staff-otp/")


def test_the_password_and_a_valid_code_open_the_admin(client, operator, device):
    answer = _admin_login(client, totp_code(device))

    assert answer.status_code == 302, answer.content.decode()[:2000]
    assert client.get("/admin/").status_code == 200
    assert client.get("/ops/").status_code == 200


def test_a_wrong_or_missing_code_is_refused_and_counted(client, operator, device):
    good = totp_code(device)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    guard = LoginGuard("127.0.0.1", "opal")

    for code in (wrong, ""):
        answer = _admin_login(client, code)
        assert answer.status_code == 200
        assert "authenticator code" in answer.content.decode()
    assert client.get("/admin/").status_code == 302
    assert guard.windows[0].retry_after() == 0
    # Two failures counted: the per-account-and-address window holds them.
    assert cache.get(guard.windows[0].count_key) == 2


def test_once_the_guard_is_full_even_the_right_code_is_not_checked(
    client, operator, device, settings
):
    settings.MOLT_LOGIN_FAILURES = (2, 900)
    for _ in range(2):
        _admin_login(client, "000000" if totp_code(device) != "000000" else "111111")

    answer = _admin_login(client, totp_code(device))

    assert answer.status_code == 200
    assert "Too many failed log-ins" in answer.content.decode()
    assert client.get("/admin/").status_code == 302


def test_a_code_works_once(client, operator, device):
    code = totp_code(device)
    assert _admin_login(client, code).status_code == 302

    other = Client()
    assert _admin_login(other, code).status_code == 200
    assert other.get("/admin/").status_code == 302


def test_enrolment_shows_the_uri_then_a_code_confirms_the_device(client, operator):
    client.force_login(operator)

    page = client.get("/accounts/staff-otp/?next=/admin/")
    assert page.status_code == 200
    pending = TOTPDevice.objects.get(user=operator, confirmed=False)
    assert pending.config_url in page.content.decode().replace("&amp;", "&")

    wrong = client.post("/accounts/staff-otp/", {"otp_token": "12", "next": "/admin/"})
    assert wrong.status_code == 200
    assert cache.get(LoginGuard("127.0.0.1", "opal").windows[0].count_key) == 1
    assert client.get("/admin/").status_code == 302
    # django-otp's own per-device back-off (1 s after a failure, doubling) is not this test's
    # subject, and waiting for it would be a wall-clock test.
    pending.refresh_from_db()
    pending.throttle_reset()

    done = client.post("/accounts/staff-otp/", {"otp_token": totp_code(pending), "next": "/admin/"})
    assert done.status_code == 302
    assert done["Location"] == "/admin/"
    assert TOTPDevice.objects.get(pk=pending.pk).confirmed
    assert client.get("/admin/").status_code == 200


def test_enrolment_cannot_replace_a_device(client, operator, device):
    client.force_login(operator)

    answer = client.get("/accounts/staff-otp/")

    assert answer.status_code == 302
    assert answer["Location"].startswith("/admin/login/")
    assert list(TOTPDevice.objects.filter(user=operator)) == [device]


def test_non_staff_users_are_never_asked_for_a_code(client, buyer):
    assert (
        client.post(
            "/accounts/login/", {"username": "alice", "password": "alice-pass-123"}
        ).status_code
        == 302
    )
    assert client.get("/wallet/").status_code == 200
    assert client.get("/accounts/staff-otp/").status_code == 404
    # The admin refuses them as before (not staff), without sending them to enrol.
    assert client.get("/admin/")["Location"].startswith("/admin/login/")


def test_a_verified_staff_session_reaches_the_admin(client, operator):
    staff_login(client, operator)

    assert client.get("/admin/").status_code == 200


def test_the_setting_off_lets_a_password_session_in(client, operator, settings):
    settings.MOLT_STAFF_OTP_REQUIRED = False
    client.force_login(operator)

    assert client.get("/admin/").status_code == 200


def test_the_operators_command_resets_a_device_and_prints_it_once(operator, device):
    out = StringIO()
    call_command("staff_totp", "opal", stdout=out)

    (new,) = TOTPDevice.objects.filter(user=operator)
    assert new.pk != device.pk and new.confirmed
    assert new.config_url in out.getvalue()

    call_command("staff_totp", "opal", "--remove", stdout=StringIO())
    assert not TOTPDevice.objects.filter(user=operator).exists()


def test_the_command_refuses_non_staff_and_unknown_users(buyer):
    with pytest.raises(CommandError, match="not staff"):
        call_command("staff_totp", "alice", stdout=StringIO())
    with pytest.raises(CommandError, match="no user"):
        call_command("staff_totp", "nobody", stdout=StringIO())


def test_a_staff_api_token_needs_the_code_too(operator, device):
    api = Client()
    url = "/api/v1/auth/token/"
    credentials = {"username": "opal", "password": "opal-pass-123"}

    refused = api.post(url, credentials, content_type="application/json")
    assert refused.status_code == 400
    assert "otp_token" in refused.content.decode()
    assert cache.get(LoginGuard("127.0.0.1", "opal").windows[0].count_key) == 1

    issued = api.post(
        url, {**credentials, "otp_token": totp_code(device)}, content_type="application/json"
    )
    assert issued.status_code == 201


def test_a_non_staff_api_token_needs_no_code(buyer):
    issued = Client().post(
        "/api/v1/auth/token/",
        {"username": "alice", "password": "alice-pass-123"},
        content_type="application/json",
    )
    assert issued.status_code == 201


def test_a_staff_session_without_the_code_creates_no_token_on_the_site(client, operator):
    client.force_login(operator)

    page = client.post("/accounts/tokens/", {"name": "laptop"})

    assert page.status_code == 200
    assert "authenticator code" in page.content.decode()
    assert not operator.api_tokens.exists()


def test_the_demo_operator_gets_a_published_key_and_can_use_the_admin(db, client):
    from django.test import override_settings

    fast = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    with override_settings(DEBUG=True, MOLT_ALLOW_SIMULATED_GPUS=True, PASSWORD_HASHERS=fast):
        out = StringIO()
        call_command("seed_demo", stdout=out)
        call_command("seed_demo", stdout=StringIO())  # a second run adds no second device

        (device,) = TOTPDevice.objects.filter(user__username="operator")
        assert "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ" in out.getvalue()
        answer = client.post(
            "/admin/login/?next=/admin/",
            {
                "username": "operator",
                "password": "operator-demo-pass",
                "otp_token": totp_code(device),
                "next": "/admin/",
            },
        )
        assert answer.status_code == 302
        assert client.get("/admin/").status_code == 200


def test_a_staff_session_without_the_code_has_no_staff_powers_in_the_api(
    client, operator, device, make_user
):
    """The site's log-in form asks no code: the session it makes is refused the admin, and in
    the API it is a plain user's (an operator's top-up of another wallet is a 403), until it
    gives its code."""
    from marketplace import ledger

    victim = make_user("victor")
    assert client.post(
        "/accounts/login/", {"username": "opal", "password": "opal-pass-123"}
    ).status_code in (200, 302)
    assert client.get("/admin/").status_code == 302  # the admin wants the code
    body = {"user": "victor", "amount": 10**12}

    refused = client.post("/api/v1/wallet/top-ups/", body, content_type="application/json")

    assert refused.status_code == 403, refused.content
    assert ledger.available_for(victim) == 0

    staff_login(client, operator)  # the same account, now with its code
    granted = client.post("/api/v1/wallet/top-ups/", body, content_type="application/json")
    assert granted.status_code == 201, granted.content
    assert ledger.available_for(victim) == 10**12


def test_a_token_issued_before_the_account_was_made_staff_has_no_staff_powers(
    operator, device, make_user
):
    from marketplace import ledger
    from marketplace.tokens import issue_api_token

    make_user("victor")
    body = {"user": "victor", "amount": 10**9}
    clerk = make_user("clerk")
    before = issue_api_token(clerk)  # issued while a plain user
    clerk.is_staff = True
    clerk.save()
    old = Client(HTTP_AUTHORIZATION=f"Bearer {before}")
    assert (
        old.post("/api/v1/wallet/top-ups/", body, content_type="application/json").status_code
        == 403
    )

    # A staff token issued with the code carries the powers.
    issued = Client().post(
        "/api/v1/auth/token/",
        {"username": "opal", "password": "opal-pass-123", "otp_token": totp_code(device)},
        content_type="application/json",
    )
    staff = Client(HTTP_AUTHORIZATION=f"Bearer {issued.json()['token']}")
    granted = staff.post("/api/v1/wallet/top-ups/", body, content_type="application/json")
    assert granted.status_code == 201, granted.content
    victor = operator.__class__.objects.get(username="victor")
    assert ledger.available_for(victor) == 10**9
