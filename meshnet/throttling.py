"""Rate limits on the calls that take a credential without an account behind them.

A password (API token exchange, the log-in page) and a one-time enrolment token are guessed
by repetition, so those calls are limited per client address. The counters live in the
default cache, which is Redis in every deployment (settings.CACHES): every gateway process
shares them, so a guesser gains nothing by spreading requests over workers.

Rates are settings (MOLT_THROTTLE_AUTH, MOLT_THROTTLE_ENROLL, MOLT_LOGIN_FAILURES); the client
address is REMOTE_ADDR, or the X-Forwarded-For hop that MOLT_TRUSTED_PROXIES says to trust.

It lives in meshnet, the lowest app, because meshnet, marketplace and frontend all use it and
each may import meshnet (config, the top, is imported by none of them).
"""

from __future__ import annotations

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


class LoginFailures:
    """Failed log-ins on the browser's form, counted per client address in a fixed window.

    Only failures count, so a person who types the password right is never held up by the
    limit; once an address has MOLT_LOGIN_FAILURES failures in the window, the form refuses to
    check any password from it until the window ends (checking would let the guessing go on).
    The count is the cache's atomic increment, so concurrent guesses are all counted.
    """

    def __init__(self, address: str) -> None:
        self.limit, self.window = settings.MOLT_LOGIN_FAILURES
        self.count_key = f"molt:login-failures:{address}"
        self.start_key = f"molt:login-failures-since:{address}"

    def retry_after(self) -> int:
        """Seconds until this address may try again; 0 when it may now."""
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


def client_address(request) -> str:
    """The address the limits count: DRF's rule (X-Forwarded-For only behind trusted proxies)."""
    return BaseThrottle().get_ident(request)
