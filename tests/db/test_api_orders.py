"""The orders API: placing an order (hold in the same transaction), reading own orders only,
the tunnel details once provisioned, the wg-quick download, and stopping. Every refusal leaves
the database and the wallet exactly as they were."""

from __future__ import annotations

import base64
import configparser
import ipaddress
import os
import shutil
import subprocess

import pytest

from marketplace import ledger
from marketplace.listings import update_listing
from marketplace.models import (
    Account,
    EscrowHold,
    IdempotencyRecord,
    LedgerEntry,
    LedgerTransaction,
    Order,
    OrderTransition,
)
from marketplace.orders import provision_order, quote_for
from meshnet.agent_channel import acknowledge_revision
from tests import factories
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

ORDERS = "/api/v1/orders/"


# 100 USD, not the shared 1000: the balances asserted below are counted from it.
@pytest.fixture
def funded_buyer(buyer):
    ledger.grant_credits(buyer, 100 * USD)
    return buyer


@pytest.fixture
def buyer_api(api_client_for, funded_buyer):
    return api_client_for(funded_buyer)


@pytest.fixture
def stranger_api(api_client_for, stranger):
    ledger.grant_credits(stranger, 100 * USD)
    return api_client_for(stranger)


def order_body(for_listing, **overrides) -> dict:
    body = {
        "listing": for_listing.pk,
        "gpu_count": 1,
        "hours": 2,
        "wireguard_public_key": factories.wg_public_key(),
    }
    body.update(overrides)
    return body


@pytest.fixture
def placed(buyer_api, listing) -> dict:
    """An order placed through the API (pending: provisioning is enqueued on commit)."""
    response = buyer_api.post(ORDERS, order_body(listing), format="json")
    assert response.status_code == 201, response.content
    return response.json()


def db_state(user) -> dict:
    """Everything an order touches, to prove a refused request wrote nothing."""
    return {
        "orders": Order.objects.count(),
        "holds": EscrowHold.objects.count(),
        "transactions": LedgerTransaction.objects.count(),
        "entries": LedgerEntry.objects.count(),
        "accounts": Account.objects.count(),
        "transitions": OrderTransition.objects.count(),
        "idempotency": IdempotencyRecord.objects.count(),
        "available": ledger.available_for(user),
        "held": ledger.held_for(user),
    }


# --- placing ---------------------------------------------------------------------------------


def test_placing_an_order_holds_its_quote_and_enqueues_provisioning_on_commit(
    buyer_api, funded_buyer, listing, django_capture_on_commit_callbacks
):
    before = ledger.available_for(funded_buyer)
    with django_capture_on_commit_callbacks() as callbacks:
        response = buyer_api.post(ORDERS, order_body(listing, gpu_count=2, hours=3), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    quote = quote_for(listing, gpu_count=2, hours=3)
    assert body["state"] == "pending"
    assert body["listing"] == listing.pk
    assert (body["gpu_count"], body["hours"]) == (2, 3)
    assert body["hold"] == quote.total_hold == 2 * 3 * 2 * USD + 50 * 10_000
    assert body["charges"] is None
    assert (body["bytes_in"], body["bytes_out"]) == (0, 0)
    for not_yet in ("job_address", "provider_address", "provider_public_key", "endpoint"):
        assert body[not_yet] is None
    order = Order.objects.get(pk=body["id"])
    assert order.buyer == funded_buyer
    assert order.hold.amount == quote.total_hold
    assert ledger.available_for(funded_buyer) == before - quote.total_hold
    assert ledger.held_for(funded_buyer) == quote.total_hold
    # The provisioning task is queued only once the order's transaction commits.
    assert len(callbacks) == 1


def _key_of(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"wireguard_public_key": "not base64 at all!"}, "wireguard_public_key", "base64"),
        ({"wireguard_public_key": _key_of(b"\x01" * 16)}, "wireguard_public_key", "32 bytes"),
        ({"wireguard_public_key": _key_of(b"\x00" * 32)}, "wireguard_public_key", "small-order"),
        ({"wireguard_public_key": ""}, "wireguard_public_key", "blank"),
        ({"hours": 0}, "hours", "greater than or equal to 1"),
        ({"hours": -5}, "hours", "greater than or equal to 1"),
        ({"hours": 100_000}, "hours", "between 1 and"),
        ({"gpu_count": 0}, "gpu_count", "greater than or equal to 1"),
        ({"gpu_count": "two"}, "gpu_count", "valid integer"),
        ({"listing": 987_654}, "listing", "unknown listing"),
        ({"listing": None}, "listing", "null"),
    ],
    ids=[
        "key-not-base64",
        "key-wrong-length",
        "key-small-order",
        "key-empty",
        "zero-hours",
        "negative-hours",
        "too-many-hours",
        "zero-gpus",
        "gpus-not-a-number",
        "unknown-listing",
        "no-listing",
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(
    buyer_api, funded_buyer, listing, overrides, field, words
):
    before = db_state(funded_buyer)

    response = buyer_api.post(ORDERS, order_body(listing, **overrides), format="json")

    assert response.status_code == 400, response.content
    messages = response.json()[field]
    assert any(words in message for message in messages), messages
    assert db_state(funded_buyer) == before


def test_missing_fields_are_each_named(buyer_api, funded_buyer):
    response = buyer_api.post(ORDERS, {}, format="json")

    assert response.status_code == 400
    assert set(response.json()) - {"detail", "code"} == {
        "listing",
        "gpu_count",
        "hours",
        "wireguard_public_key",
    }


def test_an_order_the_wallet_cannot_cover_is_a_402_and_writes_nothing(
    api_client_for, make_user, listing
):
    poor = make_user("poor")
    ledger.grant_credits(poor, 1 * USD)
    before = db_state(poor)

    response = api_client_for(poor).post(ORDERS, order_body(listing), format="json")

    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_funds"
    assert "insufficient funds" in response.json()["detail"]
    assert db_state(poor) == before


def test_more_gpus_than_are_free_is_a_409_naming_gpu_count_and_writes_nothing(
    buyer_api, funded_buyer, listing
):
    assert (
        buyer_api.post(ORDERS, order_body(listing, gpu_count=3), format="json").status_code == 201
    )
    before = db_state(funded_buyer)

    response = buyer_api.post(ORDERS, order_body(listing, gpu_count=2), format="json")

    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "oversold"
    assert body["gpu_count"] == [body["detail"]]
    assert "only 1 of 4 GPUs" in body["detail"]
    assert db_state(funded_buyer) == before


def test_a_paused_listing_cannot_be_ordered(buyer_api, funded_buyer, listing):
    update_listing(listing, is_active=False)
    before = db_state(funded_buyer)

    response = buyer_api.post(ORDERS, order_body(listing), format="json")

    assert response.status_code == 400
    assert response.json()["listing"] == [f"unknown listing {listing.pk}"]
    assert db_state(funded_buyer) == before


def test_a_provider_cannot_order_their_own_listing(api_client_for, provider, listing):
    ledger.grant_credits(provider, 100 * USD)
    before = db_state(provider)

    response = api_client_for(provider).post(ORDERS, order_body(listing), format="json")

    assert response.status_code == 409
    assert response.json()["listing"] == ["you cannot order your own listing"]
    assert db_state(provider) == before


def test_a_nodes_own_wireguard_key_is_refused_as_a_buyer_key(
    buyer_api, funded_buyer, listing, node
):
    """WireGuard ignores a peer carrying the device's own key: the buyer would pay for a tunnel
    that never comes up."""
    before = db_state(funded_buyer)

    response = buyer_api.post(
        ORDERS, order_body(listing, wireguard_public_key=node.wireguard_public_key), format="json"
    )

    assert response.status_code == 400, response.content
    assert "provider node's own key" in response.json()["wireguard_public_key"][0]
    assert db_state(funded_buyer) == before


def test_a_key_already_used_by_a_live_order_is_refused(buyer_api, funded_buyer, listing):
    key = factories.wg_public_key()
    assert (
        buyer_api.post(
            ORDERS, order_body(listing, wireguard_public_key=key), format="json"
        ).status_code
        == 201
    )
    before = db_state(funded_buyer)

    response = buyer_api.post(ORDERS, order_body(listing, wireguard_public_key=key), format="json")

    assert response.status_code == 400
    assert "already used by a live order" in response.json()["wireguard_public_key"][0]
    assert db_state(funded_buyer) == before


# --- reading -----------------------------------------------------------------------------------


def test_the_buyer_lists_and_reads_only_their_own_orders(buyer_api, stranger_api, listing, placed):
    theirs = stranger_api.post(ORDERS, order_body(listing), format="json").json()

    mine = buyer_api.get(ORDERS).json()
    assert mine["count"] == 1
    assert [o["id"] for o in mine["results"]] == [placed["id"]]
    assert buyer_api.get(f"{ORDERS}{placed['id']}/").json() == placed
    assert [o["id"] for o in stranger_api.get(ORDERS).json()["results"]] == [theirs["id"]]


def test_a_stranger_gets_404_for_someone_elses_order(stranger_api, placed):
    response = stranger_api.get(f"{ORDERS}{placed['id']}/")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_once_provisioned_the_order_shows_its_tunnel(buyer_api, placed, node):
    provision_order(placed["id"])

    body = buyer_api.get(f"{ORDERS}{placed['id']}/").json()

    order = Order.objects.select_related("job_peer").get(pk=placed["id"])
    assert body["state"] == "provisioning"
    assert body["job_address"] == order.job_peer.address
    # The jobs block (10.64.0.0/11), not the nodes' 10.100.128.0/17.
    assert ipaddress.IPv4Address(body["job_address"]) in ipaddress.IPv4Network("10.64.0.0/11")
    assert body["provider_address"] == node.mesh_address
    assert body["provider_public_key"] == node.wireguard_public_key
    assert body["endpoint"] == node.endpoint == "203.0.113.10:51820"


def test_a_completed_order_shows_what_was_charged(buyer_api, funded_buyer, placed, node):
    provision_order(placed["id"])
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision)  # the agent added the peer
    assert buyer_api.get(f"{ORDERS}{placed['id']}/").json()["state"] == "running"

    stopped = buyer_api.post(f"{ORDERS}{placed['id']}/stop/")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopping"
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision)  # the agent removed it

    body = buyer_api.get(f"{ORDERS}{placed['id']}/").json()
    order = Order.objects.select_related("settlement").get(pk=placed["id"])
    assert body["state"] == "completed"
    assert body["charges"] == order.settlement.captured
    assert ledger.held_for(funded_buyer) == 0
    assert ledger.available_for(funded_buyer) == 100 * USD - order.settlement.captured


# --- stop --------------------------------------------------------------------------------------


def test_stopping_a_pending_order_cancels_it_and_releases_the_hold(buyer_api, funded_buyer, placed):
    response = buyer_api.post(f"{ORDERS}{placed['id']}/stop/")

    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert response.json()["reason"] == "stopped by the buyer"
    assert ledger.available_for(funded_buyer) == 100 * USD
    assert ledger.held_for(funded_buyer) == 0


def test_stopping_an_ended_order_is_a_409_that_changes_nothing(buyer_api, funded_buyer, placed):
    assert buyer_api.post(f"{ORDERS}{placed['id']}/stop/").status_code == 200
    before = db_state(funded_buyer)

    response = buyer_api.post(f"{ORDERS}{placed['id']}/stop/")

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"order {placed['id']} is already cancelled",
        "code": "invalid_state",
    }
    assert db_state(funded_buyer) == before


def test_a_stranger_cannot_stop_someone_elses_order(stranger_api, stranger, funded_buyer, placed):
    before = db_state(funded_buyer)

    response = stranger_api.post(f"{ORDERS}{placed['id']}/stop/")

    assert response.status_code == 404
    assert Order.objects.get(pk=placed["id"]).state == "pending"
    assert db_state(funded_buyer) == before


# --- wireguard.conf ----------------------------------------------------------------------------


def conf_url(order_id: int) -> str:
    return f"{ORDERS}{order_id}/wireguard.conf"


def test_the_config_is_a_409_until_the_order_is_provisioned(buyer_api, placed):
    response = buyer_api.get(conf_url(placed["id"]))

    assert response.status_code == 409
    assert response.json()["code"] == "not_provisioned"
    assert "not provisioned yet" in response.json()["detail"]


def test_the_config_is_a_409_once_the_order_has_ended(buyer_api, placed):
    provision_order(placed["id"])
    assert buyer_api.post(f"{ORDERS}{placed['id']}/stop/").json()["state"] == "cancelled"

    response = buyer_api.get(conf_url(placed["id"]))

    assert response.status_code == 409
    assert "cancelled" in response.json()["detail"]


def parse_wg_quick(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(strict=True, inline_comment_prefixes=None)
    parser.optionxform = str  # keys are case-sensitive in wg-quick files
    parser.read_string(text)
    return {section: dict(parser[section]) for section in parser.sections()}


def test_the_config_is_a_wg_quick_file_for_this_orders_tunnel(buyer_api, placed, node):
    provision_order(placed["id"])
    order = Order.objects.select_related("job_peer").get(pk=placed["id"])

    response = buyer_api.get(conf_url(order.pk))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="molt-order-{order.pk}.conf"'
    config = parse_wg_quick(response.content.decode())
    assert config["Interface"] == {"Address": f"{order.job_peer.address}/32"}
    # The buyer's address is its job address, of the IP plan's jobs block (not the nodes' /17).
    assert ipaddress.IPv4Interface(config["Interface"]["Address"]).ip in ipaddress.IPv4Network(
        "10.64.0.0/11"
    )
    assert config["Peer"] == {
        "PublicKey": node.wireguard_public_key,
        "AllowedIPs": f"{node.mesh_address}/32",
        "Endpoint": node.endpoint,
        "PersistentKeepalive": "25",
    }
    assert "# PrivateKey" in response.content.decode()


def test_with_the_hub_on_the_config_names_the_hub_as_a_second_peer(
    buyer_api, placed, node, settings
):
    """The hub sees the buyer's public mapping from its keepalives (docs/nat.md, punching)."""
    from meshnet.hub import hub_public_key

    settings.MOLT_HUB_ENDPOINT = "192.0.2.10:51800"
    provision_order(placed["id"])

    text = buyer_api.get(conf_url(placed["id"])).content.decode()

    provider_peer, hub_peer = text.split("[Peer]")[1:]
    assert f"PublicKey = {node.wireguard_public_key}" in provider_peer
    assert (
        hub_peer.split()
        == (
            f"PublicKey = {hub_public_key()} AllowedIPs = 10.100.0.1/32 "
            "Endpoint = 192.0.2.10:51800 PersistentKeepalive = 25"
        ).split()
    )


def test_the_config_is_served_to_a_client_that_accepts_only_text(buyer_api, placed):
    provision_order(placed["id"])

    response = buyer_api.get(conf_url(placed["id"]), HTTP_ACCEPT="text/plain")

    assert response.status_code == 200
    assert response.content.startswith(b"# MOLT order")


def test_wg_quick_accepts_the_config_once_the_private_key_is_filled_in(
    buyer_api, placed, node, tmp_path
):
    if shutil.which("wg") is None or shutil.which("wg-quick") is None:
        pytest.skip("needs wireguard-tools (wg, wg-quick): apt-get install wireguard-tools")
    if os.geteuid() != 0:
        pytest.skip("wg-quick strip re-executes itself through sudo unless run as root")
    provision_order(placed["id"])
    order = Order.objects.select_related("job_peer").get(pk=placed["id"])
    text = buyer_api.get(conf_url(order.pk)).content.decode()
    private_key = subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, check=True
    ).stdout.strip()
    filled = text.replace(
        next(line for line in text.splitlines() if line.startswith("# PrivateKey")),
        f"PrivateKey = {private_key}",
    )
    path = tmp_path / "molt0.conf"  # wg-quick wants an interface name + .conf
    path.write_text(filled)
    path.chmod(0o600)

    result = subprocess.run(
        ["wg-quick", "strip", str(path)], capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 0, result.stderr
    # strip keeps what `wg setconf` reads and drops wg-quick's own keys (Address).
    stripped = parse_wg_quick(result.stdout)
    assert stripped["Interface"] == {"PrivateKey": private_key}
    assert stripped["Peer"]["PublicKey"] == node.wireguard_public_key
    assert stripped["Peer"]["AllowedIPs"] == f"{node.mesh_address}/32"
    assert parse_wg_quick(filled)["Interface"]["Address"] == f"{order.job_peer.address}/32"


def test_a_stranger_gets_404_for_someone_elses_config(stranger_api, placed):
    provision_order(placed["id"])

    response = stranger_api.get(conf_url(placed["id"]))

    assert response.status_code == 404
