"""API tokens expire, and their owner lists and revokes them through the API (issue 15 item 7):
a leaked token no longer works forever, and a CLI user can see and cut off their tokens
without the browser."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.models import ApiToken
from marketplace.tokens import hash_api_token, issue_api_token

pytestmark = [pytest.mark.db, pytest.mark.django_db]

TOKENS = "/api/v1/auth/tokens/"


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_a_new_token_expires_after_the_configured_days(buyer, settings):
    settings.MOLT_API_TOKEN_TTL_DAYS = 30
    before = timezone.now()

    token = issue_api_token(buyer, name="cli")

    record = ApiToken.objects.get(token_hash=hash_api_token(token))
    assert before + timedelta(days=30) <= record.expires_at <= timezone.now() + timedelta(days=30)


def test_an_expired_token_is_refused_with_a_message_that_says_so(buyer):
    token = issue_api_token(buyer)
    ApiToken.objects.filter(token_hash=hash_api_token(token)).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )

    response = bearer(token).get("/api/v1/orders/")

    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_the_owner_lists_their_tokens_without_their_secrets(buyer, provider):
    mine = issue_api_token(buyer, name="laptop")
    issue_api_token(provider, name="not mine")

    response = bearer(mine).get(TOKENS)

    assert response.status_code == 200
    rows = response.json()["results"]
    assert [row["name"] for row in rows] == ["laptop"]
    assert set(rows[0]) == {"id", "name", "hint", "created_at", "last_used_at", "expires_at"}
    assert mine not in response.content.decode()
    assert rows[0]["hint"] == mine[:9]


def test_revoking_a_token_cuts_it_off_and_a_strangers_id_is_404(buyer, provider):
    keep = issue_api_token(buyer, name="keep")
    cut = issue_api_token(buyer, name="cut")
    theirs = issue_api_token(provider)
    cut_id = ApiToken.objects.get(token_hash=hash_api_token(cut)).pk
    their_id = ApiToken.objects.get(token_hash=hash_api_token(theirs)).pk

    assert bearer(keep).delete(f"{TOKENS}{their_id}/").status_code == 404
    assert bearer(keep).delete(f"{TOKENS}{cut_id}/").status_code == 204

    assert bearer(cut).get("/api/v1/orders/").status_code == 401
    assert bearer(keep).get("/api/v1/orders/").status_code == 200
    assert bearer(theirs).get("/api/v1/orders/").status_code == 200


def test_last_used_is_written_at_most_once_a_minute(buyer):
    token = issue_api_token(buyer)
    client = bearer(token)
    client.get("/api/v1/orders/")
    first = ApiToken.objects.get(token_hash=hash_api_token(token)).last_used_at

    client.get("/api/v1/orders/")
    assert ApiToken.objects.get(token_hash=hash_api_token(token)).last_used_at == first

    ApiToken.objects.filter(token_hash=hash_api_token(token)).update(
        last_used_at=first - timedelta(minutes=2)
    )
    client.get("/api/v1/orders/")
    assert ApiToken.objects.get(token_hash=hash_api_token(token)).last_used_at > first


def test_tokens_expired_a_month_ago_are_purged_the_others_kept(buyer, settings):
    """Every auth/token/ call adds a row (issue 15, finding 7): the hourly purge bounds them."""
    from marketplace.tasks import purge_expired_tokens
    from marketplace.tokens import EXPIRED_TOKENS_KEPT

    for name in ("live", "recent", "old"):
        issue_api_token(buyer, name=name)
    now = timezone.now()
    ApiToken.objects.filter(name="recent").update(expires_at=now - timedelta(days=1))
    ApiToken.objects.filter(name="old").update(
        expires_at=now - EXPIRED_TOKENS_KEPT - timedelta(seconds=1)
    )

    assert purge_expired_tokens() == 1

    assert sorted(ApiToken.objects.values_list("name", flat=True)) == ["live", "recent"]
    entry = settings.CELERY_BEAT_SCHEDULE["purge-expired-tokens"]
    assert entry == {"task": "marketplace.tasks.purge_expired_tokens", "schedule": 3600.0}


def test_tokens_issued_before_expiry_existed_get_ninety_days_from_their_issue(buyer):
    import importlib

    from django.apps import apps

    migration = importlib.import_module("marketplace.migrations.0012_api_token_staff_code")
    issue_api_token(buyer, name="old")
    issue_api_token(buyer, name="new")
    issued = timezone.now() - timedelta(days=100)
    ApiToken.objects.filter(name="old").update(expires_at=None, created_at=issued)
    new_expiry = ApiToken.objects.get(name="new").expires_at

    migration.expire_old_tokens(apps, None)

    assert ApiToken.objects.get(name="old").expires_at == issued + timedelta(days=90)
    assert ApiToken.objects.get(name="new").expires_at == new_expiry
