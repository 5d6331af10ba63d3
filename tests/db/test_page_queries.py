"""Every page's SQL query count stays the same when the data grows: the demo market with a
buyer's history once (tests/scaled_market.py), then three times over with the same users, so
the buyer has three times the orders, ledger entries, tokens and disputes, the provider three
times the nodes and listings, and the marketplace three times the listings (more than a page).

A query per row (an N+1) shows as a count that differs between the two sizes; the same pages'
server time at ten times the demo is measured by benchmarks/pages.py, not asserted here."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from marketplace.audit import record_audit_run
from marketplace.models import LedgerEntry, Listing, Order
from tests.factories import staff_login
from tests.scaled_market import page_paths, seed_scaled_market

pytestmark = [pytest.mark.db, pytest.mark.django_db]

# A page is allowed this many queries at any size: session and user, then a handful of
# aggregates and one query per list. The ops dashboard has one aggregate per figure, and two
# queries for each of its queues (disputes, payouts: the rows and the size).
MAX_QUERIES = {"/ops/": 22}
MAX_QUERIES_DEFAULT = 10


def clients() -> dict[str, Client]:
    users = get_user_model()
    operator = users.objects.create_user("page-queries-operator", is_staff=True)
    logged_in = {
        "buyer": users.objects.get(username="buyer"),
        "provider": users.objects.get(username="dc-provider"),
        "operator": operator,
    }
    result = {"anonymous": Client()}
    for who, user in logged_in.items():
        result[who] = Client()
        staff_login(result[who], user)
    return result


def count_queries(browsers: dict[str, Client], paths: dict[str, tuple[str, str]]) -> dict:
    counts = {}
    for name, (who, path) in paths.items():
        browser = browsers[who]
        assert browser.get(path).status_code == 200, name  # warm: session, content types
        with CaptureQueriesContext(connection) as queries:
            response = browser.get(path)
        assert response.status_code == 200, name
        counts[name] = (len(queries), [q["sql"][:160] for q in queries.captured_queries])
    return counts


def test_no_page_costs_more_queries_with_three_times_the_data():
    (first,) = seed_scaled_market(1, shared_users=True, history=True, sample_every_s=300)
    record_audit_run(source="beat")  # as on a running gateway: /ops/ shows the stored run
    browsers = clients()
    paths = page_paths(first)
    once = count_queries(browsers, paths)

    seed_scaled_market(2, start=1, shared_users=True, history=True, sample_every_s=300)
    buyer = get_user_model().objects.get(username="buyer")
    # The second size really is bigger where the pages list rows: past one page of 25.
    assert Order.objects.filter(buyer=buyer).count() > 50
    assert LedgerEntry.objects.filter(account__user=buyer, account__kind="wallet").count() > 50
    assert Listing.objects.available().count() > 25
    thrice = count_queries(browsers, paths)

    grew = {
        name: {"1x": once[name][0], "3x": thrice[name][0], "queries at 3x": thrice[name][1]}
        for name in paths
        if thrice[name][0] != once[name][0]
    }
    assert grew == {}, grew
    too_many = {
        name: (count, sql)
        for name, (count, sql) in thrice.items()
        if count > MAX_QUERIES.get(name, MAX_QUERIES_DEFAULT)
    }
    assert too_many == {}, too_many
