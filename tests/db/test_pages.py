"""The marketplace page at `/`: what a person sees of the demo market, its filters and sorting,
no external assets, and a bounded number of queries."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import override_settings

from marketplace.models import Listing
from marketplace.orders import place_order
from tests.factories import wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db, pytest.mark.usefixtures("nodes_online")]

ROW = re.compile(r'<tr class="listing[^"]*" data-listing-id="(\d+)">(.*?)</tr>', re.S)


@pytest.fixture
def market():
    """The demo market of `make run`, built by seed_demo through the real services."""
    fast = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    with override_settings(DEBUG=True, MOLT_ALLOW_SIMULATED_GPUS=True, PASSWORD_HASHERS=fast):
        call_command("seed_demo", stdout=StringIO())
    return Listing.objects.available()


def rows(response) -> list[tuple[int, str]]:
    assert response.status_code == 200
    return [(int(pk), body) for pk, body in ROW.findall(response.content.decode())]


def ids(response) -> list[int]:
    return [pk for pk, _ in rows(response)]


def cells(body: str) -> list[str]:
    return [
        re.sub(r"<[^>]+>|\s+", " ", cell).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)
    ]


def test_the_page_lists_every_available_listing_cheapest_first(client, market):
    listed = ids(client.get("/"))

    expected = list(market.order_by("price_per_gpu_hour", "id").values_list("pk", flat=True))
    assert listed == expected
    assert len(listed) >= 8


def test_a_deleted_listing_is_not_shown(client, market):
    gone = market.first()
    Listing.objects.filter(pk=gone.pk).update(is_active=False)

    assert gone.pk not in ids(client.get("/"))


def test_prices_are_shown_in_usd_with_region_and_simulated_badge(client, market):
    rtx = market.filter(gpu_model__contains="RTX 4090", price_per_gpu_hour=350_000).get()

    body = dict(rows(client.get("/")))[rtx.pk]

    columns = cells(body)
    assert "NVIDIA GeForce RTX 4090" in columns[0]
    assert "simulated" in columns[0]
    assert columns[1] == "24 GB"
    assert columns[3] == "$0.35"  # 350,000 micro-USD per GPU-hour
    assert columns[4] == "$0.005"  # 5,000 micro-USD per GiB: not rounded away to $0.01 (3 decimals)
    assert columns[5] == "eu-west"


@pytest.mark.parametrize("simulated_agents", [True, False])
def test_the_simulated_badge_says_tunnels_carry_nothing_only_for_simulated_demo_agents(
    client, market, settings, simulated_agents
):
    """make run tells the web process what its demo nodes are (MOLT_DEMO_AGENTS): simulated
    agents' tunnels carry nothing and the badge says so; real demo daemons (and any test
    machine with simulated GPUs) move packets, so their badge speaks of the GPUs alone."""
    settings.MOLT_DEMO_SIMULATED_AGENTS = simulated_agents
    listing = market.first()

    for path in ("/", f"/listings/{listing.pk}/"):
        page = client.get(path).content.decode()
        (title,) = set(re.findall(r'<span class="badge simulated" title="([^"]*)"', page))
        assert title.startswith("This node reported simulated GPUs")
        assert ("their tunnels carry no traffic" in title) is simulated_agents, title


def test_filter_by_region(client, market):
    listed = ids(client.get("/", {"region": "asia"}))

    assert listed
    assert set(listed) == set(market.filter(region="asia").values_list("pk", flat=True))


def test_filter_by_gpu_model(client, market):
    model = market.filter(gpu_model__contains="H100").values_list("gpu_model", flat=True).first()

    listed = ids(client.get("/", {"gpu_model": model}))

    assert listed
    assert set(listed) == set(market.filter(gpu_model=model).values_list("pk", flat=True))


def test_filter_by_min_vram(client, market):
    listed = ids(client.get("/", {"min_vram_gb": "48"}))

    assert set(listed) == set(market.filter(vram_gb__gte=48).values_list("pk", flat=True))
    assert market.filter(vram_gb__lt=48).exists()  # the filter removed something


def test_filter_by_max_price_in_usd(client, market):
    listed = ids(client.get("/", {"max_price": "0.35"}))

    assert set(listed) == set(
        market.filter(price_per_gpu_hour__lte=350_000).values_list("pk", flat=True)
    )
    assert 0 < len(listed) < market.count()


def test_filter_by_max_price_per_gib_in_usd(client, market):
    cheapest = min(market.values_list("price_per_gib", flat=True))
    listed = ids(client.get("/", {"max_price_per_gib": f"{cheapest / 1_000_000:.6f}"}))

    assert set(listed) == set(
        market.filter(price_per_gib__lte=cheapest).values_list("pk", flat=True)
    )
    assert 0 < len(listed) < market.count()


def test_filter_by_min_reliability_shows_only_nodes_with_that_score(client, market):
    from marketplace.models import NodeReliability

    scored = market.first()
    NodeReliability.objects.create(
        node=scored.node, score=97, jobs_completed=30, jobs_failed=1, uptime_bp=10_000
    )
    listed = ids(client.get("/", {"min_reliability": "90"}))

    assert set(listed) == set(market.filter(node=scored.node).values_list("pk", flat=True))
    assert "97" in dict(rows(client.get("/")))[scored.pk]


def test_filter_by_min_gpus_counts_only_free_gpus(client, market):
    """GPUs held by a live order are not free: an 8-GPU listing with 6 ordered offers 2."""
    big = market.filter(gpu_count=8).first()
    buyer = get_user_model().objects.get(username="demo-buyer")
    place_order(
        buyer, listing_id=big.pk, gpu_count=6, hours=1, wireguard_public_key=wg_public_key()
    )

    response = client.get("/", {"min_gpus": "4"})

    assert big.pk not in ids(response)
    assert set(ids(response)) == set(
        market.filter(gpu_count__gte=4).exclude(pk=big.pk).values_list("pk", flat=True)
    )
    assert cells(dict(rows(client.get("/")))[big.pk])[2] == "2 / 8"


def test_filters_combine(client, market):
    listed = ids(client.get("/", {"region": "eu-west", "max_price": "1.00", "min_vram_gb": "24"}))

    expected = market.filter(region="eu-west", price_per_gpu_hour__lte=1_000_000, vram_gb__gte=24)
    assert set(listed) == set(expected.values_list("pk", flat=True))
    assert listed


def test_sort_by_price_high_to_low(client, market):
    listed = ids(client.get("/", {"sort": "-price"}))

    prices = [Listing.objects.get(pk=pk).price_per_gpu_hour for pk in listed]
    assert prices == sorted(prices, reverse=True)
    assert len(set(prices)) > 1


def test_a_bad_filter_value_is_reported_and_the_others_still_apply(client, market):
    response = client.get("/", {"max_price": "cheap", "region": "asia"})

    assert "Enter a number." in response.content.decode()
    assert set(ids(response)) == set(market.filter(region="asia").values_list("pk", flat=True))


def test_no_match_says_so(client, market):
    response = client.get("/", {"max_price": "0.01"})

    assert ids(response) == []
    assert "No listing matches these filters." in response.content.decode()


def test_the_page_works_on_an_empty_market(client, db):
    response = client.get("/")

    assert ids(response) == []
    assert "0 listings available" in response.content.decode()


def test_the_page_loads_no_external_assets(client, market):
    html = client.get("/").content.decode()

    references = re.findall(r'(?:src|href|action)\s*=\s*"([^"]*)"', html)
    assert references
    external = [ref for ref in references if re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", ref, re.I)]
    assert external == []
    assert "/static/frontend/molt.css" in references
    assert "/api/docs/" in references
    assert "/admin/" not in references  # the Admin link is for staff only


def test_the_page_costs_a_bounded_number_of_queries(client, market, django_assert_max_num_queries):
    # Models for the filter, the count and one page of rows with nodes, owners and free GPUs:
    # a query per row (N+1) would blow this with the demo market's ten listings.
    with django_assert_max_num_queries(4):
        response = client.get("/", {"min_gpus": "1", "sort": "-free"})
    assert len(ids(response)) >= 8


def test_the_health_check_still_answers(client, db):
    response = client.get("/healthz/")

    assert response.status_code == 200
    assert response.content == b"ok"


def test_an_invalid_filter_is_marked_and_the_count_does_not_claim_it_applied(client, market):
    response = client.get("/", {"max_price": "cheap", "min_vram_gb": "24"})
    html = response.content.decode()

    summary = re.search(r'<p class="summary" id="summary">\s*(.*?)\s*</p>', html, re.S).group(1)
    assert "match your filters" not in summary
    assert "fix the ones marked" in summary
    assert "Enter a number" in html  # the error beside the field
