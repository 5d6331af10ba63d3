"""What every browser test shares: Debian's Chromium driven by Playwright's sync API, where
screenshots go, and a staff member's log-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


@pytest.fixture
def browser_page(monkeypatch) -> Iterator[Any]:
    """A fresh Chromium page (1280x900, downloads accepted, 20 s default timeout)."""
    # Playwright's sync API runs an event loop in this thread; Django refuses ORM calls from a
    # thread with a running loop unless told the caller knows what it is doing (the tests touch
    # the database only between browser steps, never concurrently with them).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True
        )
        page = context.new_page()
        page.set_default_timeout(20_000)
        try:
            yield page
        finally:
            context.close()
            browser.close()
            # The test's queries ran while Playwright's loop held this thread, and Django kept
            # them on a connection of their own (its connections are per async context there):
            # close it, or the test database cannot be dropped at the end of the session.
            connections.close_all()


def staff_log_in(page, username: str, password: str, url: str | None = None) -> None:
    """Log `username` in on the admin's log-in form (at `url`, or where `page` already is):
    password and the TOTP code of the user's confirmed authenticator device, which staff give
    too (frontend/staff_otp.py); returns once the form's answer has loaded."""
    from django_otp.plugins.otp_totp.models import TOTPDevice

    from tests.factories import totp_code

    if url is not None:
        page.goto(url)
    device = TOTPDevice.objects.get(user__username=username, confirmed=True)
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.fill("#id_otp_token", totp_code(device))
    with page.expect_navigation():
        page.click("input[type=submit]")
