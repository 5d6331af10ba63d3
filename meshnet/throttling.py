"""Rate limits on the calls that take a credential without an account behind them.

A password (API token exchange, the log-in page) and a one-time enrolment token are guessed
by repetition, so those calls are limited per client address. The counters live in the
default cache, which is Redis in every deployment (settings.CACHES): every gateway process
shares them, so a guesser gains nothing by spreading requests over workers.

Rates are settings (MOLT_THROTTLE_AUTH, MOLT_THROTTLE_ENROLL, MOLT_LOGIN_FAILURES*,
MOLT_SIGNUPS_PER_ADDRESS); the client
address is REMOTE_ADDR, or the X-Forwarded-For hop that MOLT_TRUSTED_PROXIES says to trust.

It lives in meshnet, the lowest app, because meshnet, marketplace and frontend all use it and
each may import meshnet (config, the top, is imported by none of them).
"""

from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.throttling import AnonRateThrottle, BaseThrottle

# DRF's AnonRateThrottle counts per client address; these calls take no authentication, so
# every caller is anonymous and the scope picks the rate.


class AuthTokenThrottle(AnonRateThrottle):
    """POST /api/v1/auth/token/: a username and password for an API token."""

    scope = "auth"


class EnrollThrottle(AnonRateThrottle):
    """POST /api/v1/nodes/enroll/: a one-time enrolment token inside a signed request."""

    scope = "enroll"


class FailureWindow:
    """A count of failures under one key in a fixed window of the shared cache. The count is the
    cache's atomic increment, so concurrent failures are all counted."""

    def __init__(self, key: str, limit: int, window: int) -> None:
        self.limit, self.window = limit, window
        self.count_key = f"molt:failures:{key}"
        self.start_key = f"molt:failures-since:{key}"

    def retry_after(self) -> int:
        """Seconds until the key may try again; 0 when it may now."""
        if (cache.get(self.count_key) or 0) < self.limit:
            return 0
        started = cache.get(self.start_key) or time.time()
        return max(1, int(started + self.window - time.time()) + 1)

    def record(self) -> None:
        cache.add(self.start_key, time.time(), timeout=self.window)
        cache.add(self.count_key, 0, timeout=self.window)
        try:
            cache.incr(self.count_key)
        except ValueError:  # the window ended between add and incr
            cache.set(self.count_key, 1, timeout=self.window)


def _account_key(username: str) -> str:
    # Hashed: a username may hold any character, and the cache key must not.
    return hashlib.sha256(username.strip().casefold().encode()).hexdigest()[:32]


class LoginGuard:
    """Failed log-ins, for every surface that checks a password (the site's form, the admin's,
    the API token exchange), counted three ways in the same window:

    - the account from this address (MOLT_LOGIN_FAILURES, 10): one guesser is stopped, and the
      account's owner elsewhere, or a colleague behind the same NAT, is not held up;
    - the account from anywhere (MOLT_LOGIN_FAILURES_PER_ACCOUNT, 50): guessing spread over many
      addresses is stopped too (at most 50 guesses per window);
    - the address for any account (MOLT_LOGIN_FAILURES_PER_ADDRESS, 100): one address trying
      many accounts is stopped, with room for a whole office behind one NAT.

    Only failures count, so a person who types the password right is never held up; once any
    count is full, no password is checked (checking would let the guessing go on) until its
    window ends.
    """

    def __init__(self, address: str, username: str) -> None:
        limit, window = settings.MOLT_LOGIN_FAILURES
        account = _account_key(username)
        self.windows = (
            FailureWindow(f"login:{account}:{address}", limit, window),
            FailureWindow(
                f"login-account:{account}", settings.MOLT_LOGIN_FAILURES_PER_ACCOUNT, window
            ),
            FailureWindow(
                f"login-address:{address}", settings.MOLT_LOGIN_FAILURES_PER_ADDRESS, window
            ),
        )

    def retry_after(self) -> int:
        return max(w.retry_after() for w in self.windows)

    def record(self) -> None:
        for w in self.windows:
            w.record()


def wait_message(seconds: int, what: str) -> str:
    minutes = (seconds + 59) // 60
    return f"Too many {what}. Try again in {minutes} minute{'s' if minutes != 1 else ''}."


class SignUps:
    """New accounts per client address: MOLT_SIGNUPS_PER_ADDRESS per hour, so one address cannot
    mint accounts by the hundred (each a fresh identity for abuse)."""

    def __init__(self, address: str) -> None:
        self.window = FailureWindow(f"signup:{address}", settings.MOLT_SIGNUPS_PER_ADDRESS, 3600)

    def retry_after(self) -> int:
        return self.window.retry_after()

    def record(self) -> None:
        self.window.record()


def client_address(request) -> str:
    """The address the limits count: DRF's rule (X-Forwarded-For only behind trusted proxies)."""
    return BaseThrottle().get_ident(request)
