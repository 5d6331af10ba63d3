"""The operators' console reads as MOLT's, with plurals a person would write, and the Admin link
shows only to staff (issue 12 item 7)."""

from __future__ import annotations

import pytest

from tests.factories import staff_login

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def test_the_admin_is_branded_and_its_plurals_are_english(client, make_user):
    staff_login(client, make_user("operator", is_staff=True, is_superuser=True))

    page = client.get("/admin/").content.decode()

    assert "MOLT operations" in page
    assert "Django administration" not in page
    assert "Ledger entries" in page and "Node reliabilities" in page
    assert "entrys" not in page and "reliabilitys" not in page


@pytest.mark.parametrize(("staff", "shown"), [(False, False), (True, True)])
def test_the_admin_link_shows_to_staff_only(client, make_user, staff, shown):
    staff_login(client, make_user("someone", is_staff=staff))

    page = client.get("/").content.decode()

    assert ('id="nav-admin"' in page) is shown


def test_a_visitor_sees_no_admin_link(client):
    assert 'id="nav-admin"' not in client.get("/").content.decode()


def test_the_favicon_is_linked_and_its_guessed_address_leads_to_it(client):
    page = client.get("/").content.decode()
    assert 'rel="icon"' in page and "favicon.svg" in page
    guessed = client.get("/favicon.ico")
    assert guessed.status_code == 301 and guessed["Location"].endswith("frontend/favicon.svg")
