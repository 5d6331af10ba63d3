"""One person's pages and API answers carry Cache-Control: no-store, private; anonymous pages
stay cacheable (frontend.security.PrivateNoStoreMiddleware)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def _directives(response) -> set[str]:
    return {part.strip() for part in response.get("Cache-Control", "").split(",") if part.strip()}


@pytest.mark.parametrize("page", ["/orders/", "/wallet/", "/accounts/tokens/", "/provider/nodes/"])
def test_a_signed_in_buyers_pages_are_never_stored(client, buyer, page):
    client.force_login(buyer)

    response = client.get(page)

    assert response.status_code in (200, 302), page
    assert {"no-store", "private"} <= _directives(response)


def test_an_api_answer_to_a_token_is_never_stored(api_client_for, buyer):
    response = api_client_for(buyer).get("/api/v1/orders/")

    assert response.status_code == 200
    assert {"no-store", "private"} <= _directives(response)


def test_an_anonymous_page_stays_cacheable(client):
    response = client.get("/")

    assert response.status_code == 200
    assert "no-store" not in _directives(response)
