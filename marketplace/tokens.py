"""API tokens: issued once in plaintext, stored only as a SHA-256 hash, revoked by deleting."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from marketplace.models import ApiToken

API_TOKEN_PREFIX = "molt_"  # noqa: S105  (a prefix, not a secret)


def hash_api_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_api_token(user, name: str = "", *, staff_code: bool = False) -> str:
    """A new API token for `user`, valid for MOLT_API_TOKEN_TTL_DAYS; the plaintext is returned
    once and only its hash is kept. `staff_code`: a staff account gave its second factor for it
    (ApiToken.staff_code)."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    ApiToken.objects.create(
        user=user,
        name=name,
        token_hash=hash_api_token(token),
        hint=token[:9],
        expires_at=timezone.now() + timedelta(days=settings.MOLT_API_TOKEN_TTL_DAYS),
        staff_code=staff_code,
    )
    return token


# Expired tokens stay listed (as expired) this long, then go: every auth/token/ call adds a row.
EXPIRED_TOKENS_KEPT = timedelta(days=30)


def purge_expired_tokens(now=None) -> int:
    """Delete tokens that expired more than EXPIRED_TOKENS_KEPT ago; how many. Hourly (beat)."""
    cutoff = (now or timezone.now()) - EXPIRED_TOKENS_KEPT
    deleted, _ = ApiToken.objects.filter(expires_at__lt=cutoff).delete()
    return deleted


def revoke_api_token(user, token_id: int) -> bool:
    """Delete one of `user`'s API tokens; requests bearing it fail from now on. False when
    `user` has no such token (another user's token id reads as unknown)."""
    deleted, _ = ApiToken.objects.filter(pk=token_id, user=user).delete()
    return bool(deleted)
