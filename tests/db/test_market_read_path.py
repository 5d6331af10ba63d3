"""The market's read path (marketplace.market): a page of listings is a fixed number of queries
however many rows there are; keyset pages walk every row once, forwards and back; offline
nodes' listings are hidden unless asked for and every row says when its node was last seen;
buyers filter on driver and CUDA minimums and sort by reliability. Enrolment's query count
does not grow with the nodes already enrolled."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from clawnode.keys import Identity
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketplace.listings import create_listing
from marketplace.models import NodeReliability
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import Node
from meshnet.versions import version_key
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

LISTINGS = "/api/v1/listings/"


def gpu(index: int, driver: str, cuda: str):
    return dataclasses.replace(factories.gpu(index), driver_version=driver, cuda_version=cuda)


def seen(node: Node, ago: timedelta | None = timedelta(0)) -> Node:
    node.last_seen_at = None if ago is None else timezone.now() - ago
    Node.objects.filter(pk=node.pk).update(last_seen_at=node.last_seen_at)
    return node


def offer(owner, *, price: int, driver="550.54.14", cuda="12.4", ago=timedelta(0), score=None):
    node = seen(factories.enrolled_node(owner, gpus=[gpu(0, driver, cuda)]), ago)
    if score is not None:
        NodeReliability.objects.create(
            node=node, score=score, jobs_completed=1, jobs_failed=0, uptime_bp=10_000
        )
    return create_listing(owner, node=node, gpu_count=1, price_per_gpu_hour=price,
                          price_per_gib=1000)  # fmt: skip


@pytest.fixture
def api(api_client_for, buyer):
    return api_client_for(buyer)


def ids(response) -> list[int]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def queries(call) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = call()
    assert response.status_code == 200
    return len(captured.captured_queries)


def test_a_page_costs_the_same_queries_with_3_or_30_listings(api, client, provider):
    for i in range(3):
        offer(provider, price=USD + i)
    api.get(LISTINGS)  # the token's last use is written at most once a minute: now
    api_few = queries(lambda: api.get(LISTINGS, {"limit": 50}))
    page_few = queries(lambda: client.get("/"))
    for i in range(27):
        offer(provider, price=2 * USD + i, score=90)
    assert queries(lambda: api.get(LISTINGS, {"limit": 50})) == api_few
    assert queries(lambda: client.get("/")) == page_few
    # token auth, and the page of rows itself (no count, no per-row query)
    assert api_few <= 3
    # models for the filter, the bounded count, the rows
    assert page_few <= 4


def test_keyset_pages_walk_every_row_once_forwards_and_back(api, provider):
    made = [offer(provider, price=USD * (i % 4)).pk for i in range(11)]  # ties on price
    seen_ids, pages, path, params = [], [], LISTINGS, {"limit": 3}
    while path:
        body = api.get(path, params).json()
        pages.append(body)
        seen_ids += [row["id"] for row in body["results"]]
        path, params = body["next"], None
    assert sorted(seen_ids) == sorted(made) and len(seen_ids) == len(set(seen_ids))
    prices = [row["price_per_gpu_hour"] for p in pages for row in p["results"]]
    assert prices == sorted(prices)
    assert pages[0]["previous"] is None
    back = api.get(pages[-1]["previous"]).json()
    assert [r["id"] for r in back["results"]] == [r["id"] for r in pages[-2]["results"]]


def test_a_cursor_that_is_not_one_or_from_another_order_is_a_400_naming_cursor(api, provider):
    for i in range(3):
        offer(provider, price=USD + i)
    page = api.get(LISTINGS, {"limit": 1}).json()
    cursor = page["next"].split("cursor=")[1].split("&")[0]
    other = api.get(LISTINGS, {"cursor": cursor, "ordering": "-vram_gb"})
    assert other.status_code == 400 and "ordering" in other.json()["cursor"][0]
    junk = api.get(LISTINGS, {"cursor": "bm90IGEgY3Vyc29y"})
    assert junk.status_code == 400 and "cursor" in junk.json()


def test_offline_nodes_listings_are_hidden_unless_asked_for(api, client, provider):
    online = offer(provider, price=USD)
    stale = offer(provider, price=USD, ago=timedelta(minutes=5))
    never = offer(provider, price=USD, ago=None)
    assert ids(api.get(LISTINGS)) == [online.pk]
    rows = {r["id"]: r for r in api.get(LISTINGS, {"include_offline": "true"}).json()["results"]}
    assert set(rows) == {online.pk, stale.pk, never.pk}
    assert (rows[online.pk]["online"], rows[stale.pk]["online"]) == (True, False)
    assert rows[never.pk]["last_seen_at"] is None and rows[stale.pk]["last_seen_at"]
    assert api.get(LISTINGS, {"include_offline": "maybe"}).status_code == 400

    hidden = client.get("/").content.decode()
    assert f'data-listing-id="{stale.pk}"' not in hidden and "offline nodes hidden" in hidden
    shown = client.get("/", {"show_offline": "on"}).content.decode()
    assert f'data-listing-id="{stale.pk}"' in shown
    assert 'class="badge off">offline' in shown and "never seen" in shown and "seen <time" in shown


def test_the_market_says_a_node_seen_under_a_minute_ago_was_seen_just_now(client, provider):
    now = offer(provider, price=USD, ago=timedelta(seconds=20))
    offer(provider, price=USD, ago=timedelta(minutes=5, seconds=10))  # offline: shown on asking
    page = client.get("/", {"show_offline": "on"}).content.decode()
    assert "0\xa0minutes" not in page and "0 minutes" not in page
    assert page.count(">just now</time>") == 1
    assert ">5\xa0minutes ago</time>" in page
    detail = client.get(f"/listings/{now.pk}/").content.decode()
    assert "last seen <time" in detail and ">just now</time>" in detail


def test_buyers_filter_on_driver_and_cuda_minimums(api, client, provider):
    old = offer(provider, price=USD, driver="535.104.05", cuda="12.2")
    new = offer(provider, price=USD, driver="550.54.14", cuda="12.4")
    odd = offer(provider, price=USD, driver="unknown", cuda="")
    assert ids(api.get(LISTINGS, {"min_driver_version": "535.104"})) == [old.pk, new.pk]
    assert ids(api.get(LISTINGS, {"min_driver_version": "536"})) == [new.pk]
    assert ids(api.get(LISTINGS, {"min_cuda_version": "12.3"})) == [new.pk]
    bad = api.get(LISTINGS, {"min_cuda_version": "twelve"})
    assert bad.status_code == 400 and "min_cuda_version" in bad.json()
    row = api.get(f"{LISTINGS}{new.pk}/").json()
    assert (row["driver_version"], row["cuda_version"]) == ("550.54.14", "12.4")
    assert odd.pk in ids(api.get(LISTINGS))

    html = client.get("/", {"min_driver_version": "540"}).content.decode()
    assert f'data-listing-id="{new.pk}"' in html and f'data-listing-id="{old.pk}"' not in html
    wrong = client.get("/", {"min_cuda_version": "x.y"}).content.decode()
    assert "a version such as" in wrong and "match your filters" not in wrong


def test_sort_by_reliability_puts_unscored_nodes_last(api, client, provider):
    low = offer(provider, price=USD, score=60)
    none = offer(provider, price=USD)
    high = offer(provider, price=2 * USD, score=99)
    assert ids(api.get(LISTINGS, {"ordering": "-reliability"})) == [high.pk, low.pk, none.pk]
    html = client.get("/", {"sort": "-reliability"}).content.decode()
    assert html.index(f'data-listing-id="{high.pk}"') < html.index(f'data-listing-id="{none.pk}"')


def test_a_listed_row_is_what_the_listing_endpoint_shows(api, provider):
    listing = offer(provider, price=USD, score=80)
    (row,) = api.get(LISTINGS).json()["results"]
    assert row == api.get(f"{LISTINGS}{listing.pk}/").json()


def test_version_keys_order_versions():
    assert version_key("535.104.05") > version_key("535.54") > version_key("535")
    assert version_key("12.4") > version_key("12.2")
    assert version_key("") is None and version_key("x") is None and version_key("1.2.3.4") is None


def test_enrolment_queries_do_not_grow_with_enrolled_nodes(provider):
    def enrol_counted() -> int:
        issued = create_enrollment_token(provider)
        body = factories.enroll_request(Identity.generate(), issued.token, gpus=[gpu(0, "1", "1")])
        with CaptureQueriesContext(connection) as captured:
            enroll_node(body, observed_ip=None)
        return len(captured.captured_queries)

    enrol_counted()  # the first one creates the address pool's row
    first = enrol_counted()
    for _ in range(5):
        enrol_counted()
    assert enrol_counted() == first
    # 9 statements: nonce, token (with whether the identity is enrolled), pool lock + lease +
    # offset, node insert + name, GPUs, token update; and two savepoints each for enrolment's
    # and the allocation's atomic blocks inside this test's transaction (17 before: a separate
    # identity lookup, a savepoint around the nonce and a DELETE of a new node's GPUs)
    assert first <= 13
