"""What a user's account holds besides money: API tokens and SSH public keys. Kept out of
marketplace/models.py (which imports them, so Django registers them under this app) to keep
that module under 600 lines."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiToken(models.Model):
    """An API token: `molt_` + secret; only its SHA-256 is stored."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, blank=True)
    token_hash = models.CharField(max_length=64, unique=True)
    hint = models.CharField(max_length=16)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Refused from then on (marketplace.auth); every token gets MOLT_API_TOKEN_TTL_DAYS (those
    # issued before expiry existed were given 90 days from their issue: migration 0012).
    expires_at = models.DateTimeField(null=True, blank=True)
    # Issued to a staff account that gave its second factor (the API's auth/token/ with
    # otp_token, or the site's token page from a verified session): only such a token carries
    # staff powers (marketplace.auth.acts_as_staff), so an account made staff after its token
    # was issued gets no staff powers through it without a code.
    staff_code = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.hint}… ({self.user})"


class SshKey(models.Model):
    """A buyer's SSH public key; every key on the account at ordering goes into the sandbox."""

    MAX_PER_USER = 20

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ssh_keys"
    )
    name = models.CharField(max_length=100)
    # One line as authorized_keys takes it, without options: "ssh-ed25519 AAAA... comment"
    public_key = models.TextField()
    fingerprint = models.CharField(max_length=64)  # "SHA256:..." as ssh-keygen -l prints it
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["user", "fingerprint"], name="ssh_key_once_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})"
