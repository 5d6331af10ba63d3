"""/api/v1/clusters/: one POST places a multi-node order (its parts and one hold), retried with
the same Idempotency-Key it creates nothing twice; bad parts are 400s naming the field; stop
ends every part; a stranger sees nothing (404)."""

from __future__ import annotations

import pytest

from marketplace import ledger
from marketplace.audit import audit_ledger
from marketplace.cluster_models import Cluster
from marketplace.listings import create_listing
from marketplace.models import EscrowHold, IdempotencyRecord, LedgerTransaction, Order
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

URL = "/api/v1/clusters/"


@pytest.fixture
def listing_b(carol):
    node = factories.enrolled_node(
        carol, gpus=[factories.gpu(i) for i in range(2)], region="us-east"
    )
    return create_listing(
        carol, node=node, gpu_count=2, price_per_gpu_hour=1 * USD, price_per_gib=10_000
    )


@pytest.fixture
def buyer_api(api_client_for, funded_buyer):
    return api_client_for(funded_buyer)


def body(listing, listing_b, **extra) -> dict:
    return {
        "parts": [
            {"listing": listing.pk, "gpu_count": 2},
            {"listing": listing_b.pk, "gpu_count": 1},
        ],
        "wireguard_public_key": factories.wg_public_key(),
        "hours": 3,
        "on_part_loss": "degrade",
        **extra,
    }


def counts() -> tuple:
    return (
        Cluster.objects.count(),
        Order.objects.count(),
        EscrowHold.objects.count(),
        LedgerTransaction.objects.count(),
    )


def test_one_post_places_the_parts_and_one_hold_and_a_retry_creates_nothing_twice(
    buyer_api, funded_buyer, listing, listing_b
):
    data = body(listing, listing_b)
    first = buyer_api.post(URL, data, format="json", HTTP_IDEMPOTENCY_KEY="cluster-1")
    assert first.status_code == 201, first.content
    made = counts()
    assert made == (1, 2, 1, 2)  # one cluster, two parts, one hold; grant + one HOLD
    again = buyer_api.post(URL, data, format="json", HTTP_IDEMPOTENCY_KEY="cluster-1")
    assert again.status_code == 201
    assert again["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert counts() == made
    other = buyer_api.post(
        URL, body(listing, listing_b), format="json", HTTP_IDEMPOTENCY_KEY="cluster-1"
    )
    assert other.status_code == 422
    assert counts() == made

    got = first.json()
    assert got["state"] == "pending"
    assert got["on_part_loss"] == "degrade"
    assert got["hold"] == got["held"] == sum(p["hold"] for p in got["parts"])
    assert [(p["part_index"], p["listing"], p["region"], p["gpu_count"]) for p in got["parts"]] == [
        (0, listing.pk, "eu-west", 2),
        (1, listing_b.pk, "us-east", 1),
    ]
    assert all(p["state"] == "pending" and p["sandbox"] is None for p in got["parts"])
    assert ledger.held_for(funded_buyer) == got["hold"]
    # Each part is an order of the buyer's too, under /orders/.
    part = buyer_api.get(f"/api/v1/orders/{got['parts'][0]['id']}/")
    assert part.status_code == 200 and part.json()["hold"] == got["parts"][0]["hold"]
    assert (part.json()["cluster"], part.json()["part_index"]) == (got["id"], 0)
    assert audit_ledger() == []


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b["parts"].append(dict(b["parts"][0])), "parts[2].listing"),
        (lambda b: b.update(wireguard_public_key="not a key"), "wireguard_public_key"),
        (lambda b: b.pop("wireguard_public_key"), "wireguard_public_key"),
        (lambda b: b["parts"][1].update(listing=10**9), "parts[1].listing"),
        (lambda b: b.update(parts=[]), "parts"),
        (lambda b: b.update(parts=b["parts"] * 9), "parts"),
        (lambda b: b.update(on_part_loss="shrug"), "on_part_loss"),
        (lambda b: b.pop("on_part_loss"), "on_part_loss"),
        (lambda b: b["parts"][0].update(gpu_count=0), "parts"),
    ],
    ids=[
        "duplicate",
        "bad-key",
        "no-key",
        "unknown",
        "empty",
        "too-many",
        "bad-policy",
        "no-policy",
        "no-gpus",
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(
    buyer_api, listing, listing_b, mutate, field
):
    data = body(listing, listing_b)
    mutate(data)
    before = counts()
    response = buyer_api.post(URL, data, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert counts() == before
    assert not IdempotencyRecord.objects.filter(status_code__gt=0).exists()


def test_the_own_listing_is_a_409_naming_the_part(api_client_for, provider, listing, listing_b):
    ledger.grant_credits(provider, 1000 * USD)
    response = api_client_for(provider).post(URL, body(listing_b, listing), format="json")
    assert response.status_code == 409
    assert "parts[1].listing" in response.json()
    assert not Cluster.objects.exists()


def test_too_little_money_for_the_total_is_a_402(api_client_for, buyer, listing, listing_b):
    ledger.grant_credits(buyer, 1 * USD)
    response = api_client_for(buyer).post(URL, body(listing, listing_b), format="json")
    assert response.status_code == 402
    assert counts()[:3] == (0, 0, 0)


def test_stop_ends_every_part_and_a_stranger_sees_nothing(
    buyer_api, api_client_for, stranger, listing, listing_b
):
    made = buyer_api.post(URL, body(listing, listing_b), format="json").json()
    stranger_api = api_client_for(stranger)
    assert stranger_api.get(f"{URL}{made['id']}/").status_code == 404
    assert stranger_api.post(f"{URL}{made['id']}/stop/").status_code == 404
    theirs = stranger_api.get(URL).json()
    assert (theirs["results"] if isinstance(theirs, dict) else theirs) == []

    stopped = buyer_api.post(f"{URL}{made['id']}/stop/", HTTP_IDEMPOTENCY_KEY="stop-1")
    assert stopped.status_code == 200
    got = stopped.json()
    assert got["state"] == "cancelled"
    assert [p["state"] for p in got["parts"]] == ["cancelled", "cancelled"]
    assert got["held"] == 0
    assert buyer_api.post(f"{URL}{made['id']}/stop/").status_code == 409
    listed = buyer_api.get(URL).json()
    rows = listed["results"] if isinstance(listed, dict) else listed
    assert [c["id"] for c in rows] == [made["id"]]
    assert audit_ledger() == []
