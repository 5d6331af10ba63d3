"""Input an attacker sends gets a 4xx that names what is wrong, never a 500: paging numbers
past SQL's bigint, JSON nested thousands deep, a body over Django's upload limit."""

from __future__ import annotations

import json

import pytest
from django.conf import settings
from django.test import override_settings
from rest_framework.test import APIClient

from marketplace.api.parsing import MAX_JSON_DEPTH, json_depth_exceeds, loads_bounded
from marketplace.errors import MarketError
from marketplace.listings import create_listing
from marketplace.models import Listing, Order
from marketplace.money import MAX_PRICE
from marketplace.orders import quote_for
from tests.factories import USD, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db, pytest.mark.usefixtures("nodes_online")]


@pytest.fixture
def buyer_client(api_client_for, buyer):
    return api_client_for(buyer)


@pytest.mark.parametrize("path", ["/api/v1/orders/", "/api/v1/listings/", "/api/v1/nodes/"])
def test_a_limit_past_bigint_is_capped_not_an_sql_error(buyer_client, path):
    response = buyer_client.get(path, {"limit": "10000000000000000000"})

    assert response.status_code == 200
    assert response.json()["results"] is not None


def test_a_huge_limit_is_capped_at_the_page_ceiling(buyer_client, listing):
    # More rows than the ceiling, so a page that ignored it would hold them all (the audit of
    # issue 15 found this test, with one row, could not fail).
    clones = []
    for _ in range(210):
        clone = Listing.objects.get(pk=listing.pk)
        clone.pk = None
        clones.append(clone)
    Listing.objects.bulk_create(clones)

    response = buyer_client.get("/api/v1/listings/", {"limit": "999999"})

    assert response.status_code == 200
    body = response.json()
    assert len(body["results"]) == 200
    # The rest on the next page (the cursor carries the caller's limit; it is capped again).
    rest = buyer_client.get(body["next"]).json()
    assert len(rest["results"]) == 11 and rest["next"] is None


@pytest.mark.parametrize("offset", ["10000000000000000000", "-1", "1e3", "x", "1" * 5000])
def test_an_offset_out_of_range_is_a_400_naming_offset(buyer_client, offset):
    response = buyer_client.get("/api/v1/listings/", {"offset": offset})

    assert response.status_code == 400
    assert "offset" in response.json()


@pytest.mark.parametrize("limit", ["0", "-5", "ten"])
def test_a_limit_that_is_not_a_positive_number_is_a_400_naming_limit(buyer_client, limit):
    response = buyer_client.get("/api/v1/listings/", {"limit": limit})

    assert response.status_code == 400
    assert "limit" in response.json()


@pytest.mark.parametrize("depth", [10_000, MAX_JSON_DEPTH + 1])
@pytest.mark.parametrize("path", ["/api/v1/orders/", "/api/v1/nodes/enroll/"])
def test_json_nested_too_deep_is_a_400_anonymous_or_not(path, depth):
    body = "[" * depth + "]" * depth
    response = APIClient().post(path, body, content_type="application/json")

    assert response.status_code in (400, 401, 403)  # never 500; anonymous orders may be 401
    if path.endswith("enroll/"):
        assert response.status_code == 400
        assert "nested deeper" in response.json()["detail"]


def test_json_nested_too_deep_is_refused_before_the_view_for_a_signed_in_client(buyer_client):
    depth = 10_000
    response = buyer_client.post(
        "/api/v1/orders/", "[" * depth + "]" * depth, content_type="application/json"
    )

    assert response.status_code == 400
    assert "nested deeper" in response.json()["detail"]


def test_json_at_the_depth_limit_is_parsed():
    value: object = 1
    for _ in range(MAX_JSON_DEPTH):
        value = [value]  # MAX_JSON_DEPTH lists, one inside the other
    assert not json_depth_exceeds(value, MAX_JSON_DEPTH)
    assert json_depth_exceeds([value], MAX_JSON_DEPTH)
    assert loads_bounded(json.dumps(value)) == value
    with pytest.raises(ValueError, match="nested deeper"):
        loads_bounded("{" + '"a":{' * 5000 + "}" * 5001)


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
def test_a_body_over_the_upload_limit_is_a_413(buyer_client):
    response = buyer_client.post(
        "/api/v1/orders/",
        json.dumps({"listing": 1, "padding": "x" * 5000}),
        content_type="application/json",
    )

    assert response.status_code == 413
    assert response.json() == {
        "detail": "request body is larger than 1000 bytes",
        "code": "too_large",
    }


@pytest.mark.parametrize("price", [2**62, 2**63, MAX_PRICE + 1])
@pytest.mark.parametrize("field", ["price_per_gpu_hour", "price_per_gib"])
def test_a_price_past_the_ceiling_is_refused_naming_the_field(provider_api, listing, field, price):
    response = provider_api.patch(f"/api/v1/listings/{listing.pk}/", {field: price}, format="json")

    assert response.status_code == 400
    assert field in response.json()
    listing.refresh_from_db()
    assert listing.price_per_gpu_hour == 2 * USD and listing.price_per_gib == 10_000


def test_the_service_refuses_a_price_past_the_ceiling_whoever_calls_it(provider, node):
    with pytest.raises(MarketError, match="price_per_gib must be at most") as caught:
        create_listing(
            provider, node=node, gpu_count=1, price_per_gpu_hour=1, price_per_gib=MAX_PRICE + 1
        )
    assert caught.value.field == "price_per_gib"
    with pytest.raises(MarketError, match="whole number"):
        create_listing(provider, node=node, gpu_count=1, price_per_gpu_hour=1.5, price_per_gib=0)


def test_the_largest_order_at_the_ceiling_price_holds_without_overflow(
    provider, node, funded_buyer
):
    listing = create_listing(
        provider, node=node, gpu_count=4, price_per_gpu_hour=MAX_PRICE, price_per_gib=MAX_PRICE
    )
    q = quote_for(listing, gpu_count=4, hours=settings.MOLT_MAX_ORDER_HOURS)

    assert 0 < q.total_hold < 2**53  # exact in JSON numbers too, far from a bigint


@pytest.mark.parametrize("number", ["5.0", "1e3", "2.5", "NaN", "Infinity"])
def test_a_fractional_or_special_number_is_refused_not_truncated(buyer_client, listing, number):
    body = (
        f'{{"listing": {listing.pk}, "gpu_count": 1, "hours": {number},'
        f' "wireguard_public_key": "{wg_public_key()}"}}'
    )
    before = Order.objects.count()

    response = buyer_client.post("/api/v1/orders/", body, content_type="application/json")

    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert Order.objects.count() == before


def test_whole_numbers_still_parse(buyer_client, listing, funded_buyer):
    body = (
        f'{{"listing": {listing.pk}, "gpu_count": 1, "hours": 1,'
        f' "wireguard_public_key": "{wg_public_key()}"}}'
    )

    response = buyer_client.post("/api/v1/orders/", body, content_type="application/json")

    assert response.status_code == 201, response.content


def test_the_database_refuses_a_price_over_the_ceiling(listing):
    """Every write path checks MAX_PRICE; the database does too (a row written around them,
    or from before the ceiling, could make a hold overflow)."""
    from django.db import IntegrityError, transaction

    for field in ("price_per_gpu_hour", "price_per_gib"):
        with pytest.raises(IntegrityError), transaction.atomic():
            Listing.objects.filter(pk=listing.pk).update(**{field: MAX_PRICE + 1})
    Listing.objects.filter(pk=listing.pk).update(price_per_gpu_hour=MAX_PRICE)  # the ceiling: fine


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_prices_stored_over_the_ceiling_before_it_existed_are_brought_down_to_it(listing):
    import importlib

    from django.apps import apps
    from django.db import connection

    migration = importlib.import_module("marketplace.migrations.0013_clamp_listing_prices")
    assert migration.MAX_PRICE == MAX_PRICE
    # As a database from before the check held it: the constraint dropped for this test (and
    # put back: a transactional test keeps the schema it leaves).
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE marketplace_listing DROP CONSTRAINT listing_price_at_most_max")
    try:
        Listing.objects.filter(pk=listing.pk).update(price_per_gpu_hour=2**62)

        migration.clamp_prices(apps, None)

        listing.refresh_from_db()
        assert listing.price_per_gpu_hour == MAX_PRICE
    finally:
        Listing.objects.filter(price_per_gpu_hour__gt=MAX_PRICE).delete()
        with connection.cursor() as cursor:
            cursor.execute(
                "ALTER TABLE marketplace_listing ADD CONSTRAINT listing_price_at_most_max "
                f"CHECK (price_per_gpu_hour <= {MAX_PRICE})"
            )
