"""Every HTML page carries the site's Content-Security-Policy, set once by a middleware
(frontend/security.py): the pages of today, a page added tomorrow, error pages. Django's admin
and DRF's pages are the named exceptions, and stay without it."""

from __future__ import annotations

import pytest
from django.http import HttpResponse
from django.urls import URLPattern, path, reverse

from frontend import urls as frontend_urls
from frontend.security import POLICY, STAFF_AND_DOCS_POLICY
from tests.factories import staff_login

pytestmark = pytest.mark.db


def new_page(request):
    return HttpResponse("<!doctype html><title>new</title><p>a page nobody decorated</p>")


# The URLconf of test_a_page_added_later_gets_the_policy: a view that asks for nothing.
urlpatterns = [path("brand-new/", new_page)]


def frontend_paths() -> list[str]:
    """Every frontend URL pattern, its arguments filled in (1 for ints: mostly a 404 page)."""
    paths = []
    for pattern in frontend_urls.urlpatterns:
        assert isinstance(pattern, URLPattern)
        converters = pattern.pattern.converters
        kwargs = {
            name: 1 if converter.regex == "[0-9]+" else "x"
            for name, converter in (converters.items())
        }
        paths.append(reverse(f"frontend:{pattern.name}", kwargs=kwargs or None))
    return paths


def test_every_frontend_page_carries_the_policy(client, make_user):
    staff_login(client, make_user("operator", is_staff=True))
    html = 0
    for page in frontend_paths():
        response = client.get(page)
        if response["Content-Type"].startswith("text/html"):
            html += 1
            assert response.get("Content-Security-Policy") == POLICY, page
    # The marketplace, listings, orders, wallet, accounts, provider pages, /ops/, 404s...
    assert html >= 20


@pytest.mark.urls(__name__)
def test_a_page_added_later_gets_the_policy(client):
    response = client.get("/brand-new/")
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == POLICY


def test_a_page_not_found_gets_the_policy(client):
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Security-Policy"] == POLICY


def test_the_admin_and_the_api_pages_carry_it_with_inline_styles_only(client, make_user):
    """Issue 15, finding 7: no CSP on /admin/ or /api/docs/. Their scripts are files of this
    site, so scripts stay 'self' only; only their styles may be inline."""
    staff_login(client, make_user("operator", is_staff=True, is_superuser=True))
    for page in ["/admin/", "/api/docs/", "/api/v1/wallet/"]:
        response = client.get(page, HTTP_ACCEPT="text/html")
        assert response.status_code == 200, page
        assert response["Content-Type"].startswith("text/html"), page
        assert response["Content-Security-Policy"] == STAFF_AND_DOCS_POLICY, page
    directives = dict(d.split(" ", 1) for d in STAFF_AND_DOCS_POLICY.split("; "))
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self' 'unsafe-inline'"
    # The docs page's init script is a file of this site, not inline.
    docs = client.get("/api/docs/", HTTP_ACCEPT="text/html").content.decode()
    assert "<script>" not in docs and "script=" in docs
