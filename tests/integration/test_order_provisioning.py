"""An order placed over HTTP on the real ASGI server is provisioned by a real Celery worker
through Redis: the job address is allocated on commit, and the buyer's config is served."""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request

import pytest

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.tokens import issue_api_token
from tests.factories import enrolled_node, gpu, wg_public_key
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

JOBS = ipaddress.IPv4Network("10.64.0.0/11")  # buyers' job tunnel addresses (ipplan "jobs")


def call(gateway, method: str, path: str, token: str, body: dict | None = None):
    request = urllib.request.Request(
        gateway.base_url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_order_over_http_is_provisioned_by_the_worker(gateway, buyer, provider):
    node = enrolled_node(provider, gpus=[gpu(0), gpu(1)])
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=400_000, price_per_gib=10_000
    )
    ledger.grant_credits(buyer, 100_000_000)
    token = issue_api_token(buyer)
    buyer_key = wg_public_key()

    status, body = call(
        gateway,
        "POST",
        "/api/v1/orders/",
        token,
        {"listing": listing.pk, "gpu_count": 1, "hours": 2, "wireguard_public_key": buyer_key},
    )
    assert status == 201, body
    order_id = json.loads(body)["id"]

    def provisioned():
        status, body = call(gateway, "GET", f"/api/v1/orders/{order_id}/", token)
        assert status == 200, body
        data = json.loads(body)
        return data if data["state"] == "provisioning" else None

    order = wait_until(
        provisioned,
        timeout=30,
        message=f"the worker to provision order {order_id}\n{gateway.logs()}",
    )
    assert ipaddress.IPv4Address(order["job_address"]) in JOBS
    assert order["provider_address"] == node.mesh_address
    assert order["provider_public_key"] == node.wireguard_public_key

    status, config = call(gateway, "GET", f"/api/v1/orders/{order_id}/wireguard.conf", token)
    assert status == 200, config
    assert f"Address = {order['job_address']}/32" in config
    assert f"PublicKey = {node.wireguard_public_key}" in config
    assert "PrivateKey =" not in config.replace("# PrivateKey", "")
