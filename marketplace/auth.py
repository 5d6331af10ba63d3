"""API token authentication: `Authorization: Bearer molt_...` (or `Token molt_...`).

Tokens are stored as SHA-256 and looked up by hash, so the plaintext never sits in the
database and a timing difference reveals nothing about a stored token.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from rest_framework import authentication, exceptions

from marketplace.models import ApiToken
from marketplace.tokens import API_TOKEN_PREFIX, hash_api_token

LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keywords = ("bearer", "token")

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace").lower() not in self.keywords:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'")
        token = header[1].decode(errors="replace")
        if not token.startswith(API_TOKEN_PREFIX):
            raise exceptions.AuthenticationFailed("not a MOLT API token")
        record = (
            ApiToken.objects.select_related("user").filter(token_hash=hash_api_token(token)).first()
        )
        if record is None or not record.user.is_active:
            raise exceptions.AuthenticationFailed("invalid or revoked API token")
        now = timezone.now()
        if record.expires_at is not None and record.expires_at <= now:
            raise exceptions.AuthenticationFailed(
                "this API token has expired; issue a new one (POST /api/v1/auth/token/)"
            )
        # last_used_at to the minute: a write on every request would make every GET a write.
        if record.last_used_at is None or now - record.last_used_at >= LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=record.pk).update(last_used_at=now)
        return record.user, record

    def authenticate_header(self, request) -> str:
        return "Bearer"


def acts_as_staff(request) -> bool:
    """Whether an API request carries a staff account's powers (an operator's top-up of another
    wallet): through an API token (issued to staff only with the second factor:
    marketplace.api.token_views), or through a session that has given its code (django-otp's
    OTPMiddleware marks it verified). A staff session signed in with only its password (the
    site's log-in form asks no code) is a plain user's here, as it is refused the admin and the
    ops dashboard (frontend.staff_otp). MOLT_STAFF_OTP_REQUIRED=false: any staff session."""
    user = request.user
    if not (user.is_authenticated and user.is_staff):
        return False
    if not settings.MOLT_STAFF_OTP_REQUIRED:
        return True
    if isinstance(request.auth, ApiToken):
        # Issued with the code (not before the account was made staff).
        return request.auth.staff_code
    return bool(getattr(user, "is_verified", lambda: False)())
