"""The admin and the API docs run under their Content-Security-Policy (frontend/security.py:
scripts of this site only, inline styles allowed) in Debian's Chromium: Swagger UI draws the
schema, the admin's own scripts load and run, and the browser reports no violation of the
policy (it logs each one as a console error). Issue 15, finding 7: neither had a policy."""

from __future__ import annotations

import pytest
from django_otp.plugins.otp_totp.models import TOTPDevice

from tests.browser.conftest import ARTIFACTS, staff_log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.postgres]

PASSWORD = "policy-pages-2"


def violations(messages: list[str]) -> list[str]:
    return [m for m in messages if "Content Security Policy" in m]


def test_swagger_ui_and_the_admin_work_under_the_policy(
    live_server, browser_page, django_user_model
):
    page = browser_page
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)

    response = page.goto(f"{live_server.url}/api/docs/")
    assert "script-src 'self';" in response.headers["content-security-policy"]
    page.locator(".swagger-ui .info .title").wait_for()
    assert "MOLT" in page.locator(".swagger-ui .info .title").inner_text()
    page.locator(".swagger-ui .opblock").first.wait_for()  # the operations, from the schema
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "policy-api-docs.png"))

    operator = django_user_model.objects.create_user("operator", password=PASSWORD, is_staff=True)
    operator.is_superuser = True
    operator.save()
    TOTPDevice.objects.create(user=operator, name="phone", confirmed=True)
    staff_log_in(
        page, "operator", PASSWORD, f"{live_server.url}/admin/login/?next=/admin/auth/user/"
    )
    assert page.url.endswith("/admin/auth/user/")
    # The admin's scripts (files of this site) ran: its jQuery namespace is set up, and the
    # change list's "select all" box (actions.js) selects the rows.
    assert page.evaluate("typeof django !== 'undefined' && typeof django.jQuery === 'function'")
    page.click("#action-toggle")
    assert page.locator("input.action-select:checked").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "policy-admin.png"))

    assert not violations(console), violations(console)
