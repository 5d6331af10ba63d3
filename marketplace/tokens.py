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


def issue_api_token(user, name: str = "") -> str:
    """A new API token for `user`, valid for MOLT_API_TOKEN_TTL_DAYS; the plaintext is returned
    once and only its hash is kept."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    ApiToken.objects.create(
        user=user,
        name=name,
        token_hash=hash_api_token(token),
        hint=token[:9],
        expires_at=timezone.now() + timedelta(days=settings.MOLT_API_TOKEN_TTL_DAYS),
    )
    return token


def revoke_api_token(user, token_id: int) -> bool:
    """Delete one of `user`'s API tokens; requests bearing it fail from now on. False when
    `user` has no such token (another user's token id reads as unknown)."""
    deleted, _ = ApiToken.objects.filter(pk=token_id, user=user).delete()
    return bool(deleted)
