"""The API contract is published as OpenAPI (drf-spectacular) and is valid without warnings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rest_framework.test import APIClient

from tests.conftest import REPO

pytestmark = [pytest.mark.db, pytest.mark.django_db]

PATHS = {
    "/api/v1/auth/token/": {"post"},
    "/api/v1/auth/tokens/": {"get"},
    "/api/v1/auth/tokens/{id}/": {"delete"},
    "/api/v1/enrollment-tokens/": {"post"},
    "/api/v1/relay/pairs/": {"post"},
    "/api/v1/nodes/": {"get"},
    "/api/v1/nodes/{id}/": {"get"},
    "/api/v1/nodes/enroll/": {"post"},
    "/api/v1/nodes/address/": {"get"},
    "/api/v1/listings/": {"get", "post"},
    "/api/v1/listings/{id}/": {"get", "patch", "delete"},
    "/api/v1/orders/": {"get", "post"},
    "/api/v1/orders/{id}/": {"get"},
    "/api/v1/orders/{id}/wireguard.conf": {"get"},
    "/api/v1/orders/{id}/stop/": {"post"},
    "/api/v1/orders/{id}/rekey/": {"post"},
    "/api/v1/listings/{id}/quote/": {"get"},
    "/api/v1/wallet/": {"get"},
    "/api/v1/wallet/top-ups/": {"post"},
    "/api/v1/orders/{id}/dispute/": {"post"},
    "/api/v1/orders/{id}/receipt/": {"get"},
    "/api/v1/payouts/": {"get", "post"},
    "/api/v1/payouts/{id}/": {"get"},
    "/api/v1/ssh-keys/": {"get", "post"},
    "/api/v1/ssh-keys/{id}/": {"delete"},
    "/api/v1/clusters/": {"get", "post"},
    "/api/v1/clusters/{id}/": {"get"},
    "/api/v1/clusters/{id}/stop/": {"post"},
    "/api/v1/clusters/{id}/rekey/": {"post"},
    "/api/v1/clusters/{id}/wireguard.conf": {"get"},
}


@pytest.fixture
def schema() -> dict:
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return response.json()


def test_the_schema_documents_every_endpoint_and_method(schema):
    documented = {
        path: set(ops) & {"get", "post", "patch", "put", "delete"}
        for path, ops in schema["paths"].items()
    }
    assert documented == PATHS


def test_the_schema_documents_idempotency_keys_on_money_moving_posts(schema):
    for path in (
        "/api/v1/orders/",
        "/api/v1/orders/{id}/stop/",
        "/api/v1/orders/{id}/dispute/",
        "/api/v1/wallet/top-ups/",
        "/api/v1/payouts/",
        "/api/v1/clusters/",
        "/api/v1/clusters/{id}/stop/",
        "/api/v1/clusters/{id}/rekey/",
    ):
        headers = [
            p["name"] for p in schema["paths"][path]["post"]["parameters"] if p["in"] == "header"
        ]
        assert headers == ["Idempotency-Key"]


def test_every_operation_documents_the_503_a_lost_database_connection_answers(schema):
    # marketplace.api.errors answers 503 `unavailable` with Retry-After on any operation whose
    # database connection died (the faults tier terminates backends); it was undocumented.
    for path, operations in schema["paths"].items():
        for method in PATHS[path]:
            unavailable = operations[method]["responses"]["503"]
            assert unavailable["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }, (path, method)
            assert "unavailable" in unavailable["description"]
            assert "Retry-After" in unavailable["headers"]


def test_the_schema_documents_the_listing_filters(schema):
    names = {p["name"] for p in schema["paths"]["/api/v1/listings/"]["get"]["parameters"]}
    assert {
        "gpu_model",
        "min_vram_gb",
        "max_price",
        "region",
        "min_gpus",
        "min_reliability",
        "ordering",
    } <= names


@pytest.mark.parametrize(
    "path", ["/api/v1/orders/", "/api/v1/nodes/", "/api/v1/payouts/", "/api/v1/clusters/"]
)
def test_the_limit_offset_lists_state_their_bounds(schema, path):
    parameters = {p["name"]: p["schema"] for p in schema["paths"][path]["get"]["parameters"]}

    # What BoundedLimitOffsetPagination refuses (a 400) is what the schema calls invalid; a
    # limit above the ceiling is capped, so it has no maximum.
    assert parameters["limit"] == {"type": "integer", "minimum": 1}
    assert parameters["offset"] == {"type": "integer", "minimum": 0, "maximum": 10**9}


@pytest.mark.parametrize("of", ["orders", "clusters"])
def test_the_wireguard_config_is_documented_as_plain_text(schema, of):
    ok = schema["paths"][f"/api/v1/{of}/{{id}}/wireguard.conf"]["get"]["responses"]["200"]
    assert set(ok["content"]) == {"text/plain"}


def test_the_api_docs_page_is_served():
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_spectacular_validates_the_schema_without_warnings(tmp_path):
    env = {**os.environ, "DJANGO_DEBUG": "true"}
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "spectacular",
            "--validate",
            "--fail-on-warn",
            "--file",
            str(tmp_path / "schema.yaml"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "schema.yaml").read_text().startswith("openapi: 3")


def test_the_ssh_key_errors_and_the_order_sandbox_are_documented(schema):
    create = schema["paths"]["/api/v1/ssh-keys/"]["post"]["responses"]
    assert create["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    delete = schema["paths"]["/api/v1/ssh-keys/{id}/"]["delete"]["responses"]
    assert delete["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    key = schema["components"]["schemas"]["SshKey"]["properties"]
    assert set(key) == {"id", "name", "public_key", "fingerprint", "created_at"}
    sandbox = schema["components"]["schemas"]["Sandbox"]["properties"]
    assert {"state", "address", "image", "gpus", "ssh_command", "known_hosts"} <= set(sandbox)
    assert {"host_key_fingerprints", "ports"} <= set(sandbox)
    order = schema["components"]["schemas"]["Order"]["properties"]
    assert "sandbox" in order
    assert "image" in schema["components"]["schemas"]["OrderCreate"]["properties"]


def test_the_orders_path_documents_its_round_trip(schema):
    """The order's `path` carries the node's latest ping of the buyer (meshnet.round_trips):
    null before any, else answered, ms (null with no answer) and when it was measured."""
    components = schema["components"]["schemas"]
    path = components["Path"]["properties"]
    assert set(path) == {"kind", "relay", "region", "round_trip"}
    assert path["round_trip"]["nullable"] is True
    assert path["round_trip"]["allOf"] == [{"$ref": "#/components/schemas/RoundTrip"}]
    trip = components["RoundTrip"]["properties"]
    assert set(trip) == {"answered", "ms", "measured_at"}
    assert trip["ms"]["nullable"] is True and trip["measured_at"]["format"] == "date-time"
