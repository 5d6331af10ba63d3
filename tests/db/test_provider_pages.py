"""Provider pages (nodes, install line, listings, earnings), the install script and agent
wheel the gateway serves, and the owner events behind the live nodes page."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import tomllib
import uuid
import zipfile
from datetime import timedelta
from email.parser import Parser

import pytest
import websockets
from asgiref.sync import async_to_sync, sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from clawnode.keys import Identity
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from frontend.install import agent_source_dir, agent_wheel
from frontend.realtime import owner_group
from frontend.templatetags.molt_format import usd
from marketplace import ledger, payments
from marketplace.audit import audit_ledger
from marketplace.listings import create_listing
from marketplace.models import Listing, PayoutRequest
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import acknowledge_revision
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import EnrollmentToken, Node
from meshnet.nodes import record_heartbeat, revoke_node, update_inventory
from tests.factories import USD, enroll_request, enrolled_node, gpu, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

TOKEN_RE = re.compile(r"--token (molt_enr_[A-Za-z0-9_-]+)")


@pytest.fixture
def provider_client(client, provider):
    client.force_login(provider)
    return client


@pytest.fixture
def stranger_client(stranger):
    browser = Client()
    browser.force_login(stranger)
    return browser


# Not the shared node: two L40S (one simulated) with a heartbeat, which the pages show.
@pytest.fixture
def node(provider):
    node = enrolled_node(
        provider,
        gpus=[gpu(0, "NVIDIA L40S", 49152), gpu(1, "NVIDIA L40S", 49152, simulated=True)],
    )
    record_heartbeat(node, "203.0.113.10")
    node.refresh_from_db()
    return node


def text(response) -> str:
    assert response.status_code == 200, response.status_code
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", response.content.decode()))


# --- access ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/provider/nodes/", "/provider/listings/", "/provider/earnings/"])
def test_provider_pages_send_a_visitor_to_the_login_page(client, db, path):
    response = client.get(path)

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_a_strangers_node_card_detail_and_listing_read_as_404(stranger_client, provider, node):
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=1000
    )

    for path in (
        f"/provider/nodes/{node.pk}/",
        f"/provider/nodes/{node.pk}/card/",
        f"/provider/listings/{listing.pk}/",
    ):
        assert stranger_client.get(path).status_code == 404, path
    for path in ("pause", "resume", "delete"):
        assert stranger_client.post(f"/provider/listings/{listing.pk}/{path}/").status_code == 404
    listing.refresh_from_db()
    assert listing.is_active and listing.deleted_at is None


# --- nodes ------------------------------------------------------------------------------------


def test_the_nodes_page_shows_own_nodes_with_status_address_and_gpus(
    provider_client, node, stranger
):
    other = enrolled_node(stranger, gpus=[gpu(0, "NVIDIA H100 80GB HBM3", 81559)])

    page = text(provider_client.get("/provider/nodes/"))

    assert node.name in page and node.mesh_address in page
    assert other.name not in page and "H100" not in page
    card = re.search(
        rf'<article class="node-card[^"]*" id="node-{node.pk}".*?</article>',
        provider_client.get("/provider/nodes/").content.decode(),
        re.S,
    ).group(0)
    assert 'data-online="1"' in card and ">online<" in card
    assert card.count('class="gpu-row"') == 2
    assert "NVIDIA L40S" in card and "48 GB" in card
    assert "550.54" in card and "12.4" in card  # driver and CUDA from the agent's report
    assert card.count(">simulated<") == 1
    assert "1 machine, 1 online" in page


def test_a_node_never_heard_from_is_offline(provider_client, provider):
    silent = enrolled_node(provider)

    card = provider_client.get(f"/provider/nodes/{silent.pk}/card/").content.decode()

    assert 'data-online="0"' in card and ">offline<" in card and "never" in card


def test_the_nodes_page_with_no_node_says_how_to_add_one(provider_client):
    page = text(provider_client.get("/provider/nodes/"))

    assert "No machines yet" in page
    assert "0 machines, 0 online" in page


def test_creating_a_token_shows_the_install_command_once(provider_client, provider):
    response = provider_client.post("/provider/nodes/token/")

    html = response.content.decode()
    command = re.search(r'id="install-command"[^>]*value="([^"]+)"', html).group(1)
    token = TOKEN_RE.search(command).group(1)
    assert command == (f"curl -fsSL http://testserver/install.sh | sudo sh -s -- --token {token}")
    assert response["Cache-Control"] == "no-store"
    record = EnrollmentToken.objects.get(owner=provider)
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    # Only its hash is kept: the page never shows it again.
    again = provider_client.get("/provider/nodes/").content.decode()
    assert token not in again
    assert record.hint in again  # listed as an unused token by its hint


def test_the_token_shown_enrols_a_node_of_the_provider(provider_client, provider):
    html = provider_client.post("/provider/nodes/token/").content.decode()
    token = TOKEN_RE.search(html).group(1)

    enrolled = enroll_node(
        enroll_request(Identity.generate(), token, gpus=[gpu(0)]), observed_ip="203.0.113.9"
    ).node

    assert enrolled.owner == provider
    assert f'id="node-{enrolled.pk}"' in provider_client.get("/provider/nodes/").content.decode()


def test_the_cards_fragment_and_card_carry_every_node_in_few_queries(
    provider_client, provider, django_assert_max_num_queries
):
    for _ in range(6):
        enrolled_node(provider)

    # Session and user, the nodes with their listing counts, their GPUs, their live sandboxes,
    # pending tokens.
    with django_assert_max_num_queries(6):
        html = provider_client.get("/provider/nodes/cards/").content.decode()
    assert html.count('class="node-card') == 6


def test_a_revoked_node_is_shown_as_revoked_and_cannot_be_listed(provider_client, node):
    revoke_node(node, "test")

    card = provider_client.get(f"/provider/nodes/{node.pk}/card/").content.decode()
    assert ">revoked<" in card
    response = provider_client.post(
        f"/provider/nodes/{node.pk}/",
        {
            "gpu_model": "NVIDIA L40S",
            "gpu_count": 1,
            "price_per_gpu_hour": "1",
            "price_per_gib": "0",
        },
    )
    assert "was revoked" in response.content.decode()
    assert not Listing.objects.filter(node=node).exists()


# --- listings ---------------------------------------------------------------------------------


def test_a_listing_is_made_from_the_nodes_detected_gpus(provider_client, provider, node):
    page = text(provider_client.get(f"/provider/nodes/{node.pk}/"))
    assert "NVIDIA L40S (2 of 2 unlisted)" in page

    response = provider_client.post(
        f"/provider/nodes/{node.pk}/",
        {
            "gpu_model": "NVIDIA L40S",
            "gpu_count": "2",
            "price_per_gpu_hour": "0.89",
            "price_per_gib": "0.008",
            "region": "",
        },
    )

    assert response.status_code == 302 and response["Location"] == "/provider/listings/"
    listing = Listing.objects.get(node=node)
    assert (listing.owner, listing.gpu_model, listing.gpu_count) == (provider, "NVIDIA L40S", 2)
    assert (listing.price_per_gpu_hour, listing.price_per_gib) == (890_000, 8_000)
    assert listing.vram_gb == 48 and listing.simulated  # one of the two is simulated
    assert listing.region == node.region
    assert Listing.objects.available().filter(pk=listing.pk).exists()


def test_listing_more_gpus_than_the_node_has_is_refused_with_the_reason(
    provider_client, provider, node
):
    create_listing(provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0)

    response = provider_client.post(
        f"/provider/nodes/{node.pk}/",
        {
            "gpu_model": "NVIDIA L40S",
            "gpu_count": "2",
            "price_per_gpu_hour": "1",
            "price_per_gib": "0",
        },
    )

    assert response.status_code == 200
    assert "has 2 NVIDIA L40S GPU(s), 1 already listed" in response.content.decode()
    assert Listing.objects.filter(node=node).count() == 1


def test_a_price_finer_than_a_micro_usd_or_negative_is_refused(provider_client, node):
    for price in ("0.0000001", "-1", "lots"):
        response = provider_client.post(
            f"/provider/nodes/{node.pk}/",
            {
                "gpu_model": "NVIDIA L40S",
                "gpu_count": "1",
                "price_per_gpu_hour": price,
                "price_per_gib": "0",
            },
        )
        assert response.status_code == 200
        assert 'id="id_price_per_gpu_hour_error"' in response.content.decode(), price
    assert not Listing.objects.filter(node=node).exists()


def test_a_listing_is_edited_paused_resumed_and_deleted(provider_client, provider, node):
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=1000
    )

    edit = provider_client.get(f"/provider/listings/{listing.pk}/").content.decode()
    assert 'value="1"' in edit and 'value="0.001"' in edit  # USD, as the person typed it
    response = provider_client.post(
        f"/provider/listings/{listing.pk}/",
        {"gpu_count": "2", "price_per_gpu_hour": "1.25", "price_per_gib": "0.002"},
    )
    assert response.status_code == 302
    listing.refresh_from_db()
    assert (listing.gpu_count, listing.price_per_gpu_hour, listing.price_per_gib) == (
        2,
        1_250_000,
        2_000,
    )

    provider_client.post(f"/provider/listings/{listing.pk}/pause/")
    assert not Listing.objects.available().filter(pk=listing.pk).exists()
    assert "paused" in text(provider_client.get("/provider/listings/"))
    provider_client.post(f"/provider/listings/{listing.pk}/resume/")
    assert Listing.objects.available().filter(pk=listing.pk).exists()

    provider_client.post(f"/provider/listings/{listing.pk}/delete/")
    listing.refresh_from_db()
    assert listing.deleted_at is not None and not listing.is_active
    assert (
        f'data-listing-id="{listing.pk}"'
        not in provider_client.get("/provider/listings/").content.decode()
    )
    assert provider_client.get(f"/provider/listings/{listing.pk}/").status_code == 404


def test_a_listing_cannot_shrink_below_the_gpus_live_orders_use(
    provider_client, provider, node, buyer
):
    listing = create_listing(
        provider, node=node, gpu_count=2, price_per_gpu_hour=USD, price_per_gib=0
    )
    ledger.grant_credits(buyer, 100 * USD)
    place_order(
        buyer, listing_id=listing.pk, gpu_count=2, hours=1, wireguard_public_key=wg_public_key()
    )

    response = provider_client.post(
        f"/provider/listings/{listing.pk}/",
        {"gpu_count": "1", "price_per_gpu_hour": "1", "price_per_gib": "0"},
    )

    assert response.status_code == 200
    assert "2 GPUs of this listing are in use by live orders" in response.content.decode()
    listing.refresh_from_db()
    assert listing.gpu_count == 2


# --- earnings ---------------------------------------------------------------------------------


def run_order_to_settlement(buyer, listing, node):
    """An order through the real lifecycle: placed, provisioned, acknowledged by the node,
    stopped, its removal acknowledged, settled."""
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=wg_public_key()
    )
    provision_order(order.pk)
    node.refresh_from_db()
    # Acknowledged ten minutes ago, so there is time to bill.
    acknowledge_revision(node, node.desired_revision, at=timezone.now() - timedelta(minutes=10))
    order.refresh_from_db()
    stop_order(order)
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision)
    order.refresh_from_db()
    assert order.state == "completed"
    return order


def test_earnings_show_what_settled_orders_brought_in(provider_client, provider, node, buyer):
    page = text(provider_client.get("/provider/earnings/"))
    assert "No settled orders yet" in page

    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=3_600 * USD, price_per_gib=0
    )
    ledger.grant_credits(buyer, 10_000 * USD)
    order = run_order_to_settlement(buyer, listing, node)

    html = provider_client.get("/provider/earnings/").content.decode()
    settlement = order.settlement
    assert settlement.provider_amount > 0
    total = re.search(r'id="earnings-total">([^<]+)<', html).group(1)
    assert total == usd(settlement.provider_amount)
    shown = {
        name: re.search(rf'id="earnings-{name}">([^<]+)<', html).group(1)
        for name in ("available", "frozen", "pending")
    }
    assert shown == {
        "available": usd(ledger.earnings_for(provider)),
        "frozen": usd(ledger.frozen_for(provider)),
        "pending": usd(ledger.payouts_pending_for(provider)),
    }
    assert f"#{order.pk}" in html


def payout_nonce(browser) -> str:
    html = browser.get("/provider/earnings/").content.decode()
    return re.search(r'name="nonce" value="([^"]+)"', html).group(1)


def test_a_provider_requests_a_payout_of_available_earnings_once(
    provider_client, provider, node, buyer, stranger_client
):
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=3_600 * USD, price_per_gib=0
    )
    ledger.grant_credits(buyer, 10_000 * USD)
    run_order_to_settlement(buyer, listing, node)
    payments.release_due_earnings(now=timezone.now() + timedelta(days=365))
    available = ledger.earnings_for(provider)
    assert available > 5 * USD
    nonce = payout_nonce(provider_client)

    for _ in range(2):  # the same form twice: a double click
        response = provider_client.post(
            "/provider/earnings/payout/", {"amount": "5", "nonce": nonce}, follow=True
        )
        assert response.status_code == 200

    payout = PayoutRequest.objects.get(provider=provider)
    assert (payout.amount, payout.state) == (5 * USD, "requested")
    assert ledger.earnings_for(provider) == available - 5 * USD
    assert ledger.payouts_pending_for(provider) == 5 * USD
    html = response.content.decode()
    assert f'data-payout-id="{payout.pk}"' in html and "That payout was already requested" in html
    assert (
        f'data-payout-id="{payout.pk}"'
        not in stranger_client.get("/provider/earnings/").content.decode()
    )
    assert audit_ledger() == []


def test_a_payout_beyond_available_earnings_is_refused_on_the_form(provider_client, provider):
    response = provider_client.post(
        "/provider/earnings/payout/", {"amount": "5", "nonce": payout_nonce(provider_client)}
    )

    assert response.status_code == 200
    assert "insufficient funds" in response.content.decode()
    assert not PayoutRequest.objects.exists()


# --- owner events (the live nodes page) ---------------------------------------------------------


@pytest.fixture
def own_channel_layer(settings):
    """The real Redis channel layer under a prefix of this test's own."""
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [django_settings.REDIS_URL], "prefix": f"t-{uuid.uuid4().hex}"},
        }
    }
    return get_channel_layer()


def owner_events(layer, user_id: int, action) -> list[dict]:
    """Run `action` (its on-commit callbacks executed) while listening to the owner's group."""

    async def listen() -> list[dict]:
        channel = await layer.new_channel()
        await layer.group_add(owner_group(user_id), channel)
        await sync_to_async(action)()
        events = []
        while True:
            try:
                events.append(await asyncio.wait_for(layer.receive(channel), 1.0))
            except TimeoutError:
                return events

    return async_to_sync(listen)()


@pytest.mark.integration
@pytest.mark.postgres  # the integration tier needs it; SQLite's db pass skips nothing
def test_a_node_joining_going_online_and_changing_gpus_is_announced_to_its_owner_once_each(
    provider, own_channel_layer, django_capture_on_commit_callbacks
):
    identity = Identity.generate()
    token = create_enrollment_token(provider).token
    holder = {}

    def enrol():
        with django_capture_on_commit_callbacks(execute=True):
            holder["node"] = enroll_node(
                enroll_request(identity, token, gpus=[gpu(0)]), observed_ip="203.0.113.5"
            ).node

    assert [e["change"] for e in owner_events(own_channel_layer, provider.pk, enrol)] == [
        "enrolled"
    ]
    node = holder["node"]

    def heartbeats():
        for _ in range(3):
            fresh = Node.objects.get(pk=node.pk)
            with django_capture_on_commit_callbacks(execute=True):
                record_heartbeat(fresh, "203.0.113.5")

    events = owner_events(own_channel_layer, provider.pk, heartbeats)
    assert [(e["type"], e["node"], e["change"]) for e in events] == [
        ("node.changed", node.pk, "online")
    ]

    def same_then_new_inventory():
        fresh = Node.objects.get(pk=node.pk)
        with django_capture_on_commit_callbacks(execute=True):
            update_inventory(fresh, [gpu(0).to_dict()])
        with django_capture_on_commit_callbacks(execute=True):
            update_inventory(fresh, [gpu(0).to_dict(), gpu(1).to_dict()])

    events = owner_events(own_channel_layer, provider.pk, same_then_new_inventory)
    assert [e["change"] for e in events] == ["inventory"]

    def readings_then_the_same_readings():
        fresh = Node.objects.get(pk=node.pk)
        health = [{"index": 0, "temperature_c": 61, "utilization_pct": 97}]
        for _ in range(2):
            with django_capture_on_commit_callbacks(execute=True):
                update_inventory(fresh, [gpu(0).to_dict(), gpu(1).to_dict()], health)

    events = owner_events(own_channel_layer, provider.pk, readings_then_the_same_readings)
    assert [e["change"] for e in events] == ["inventory"]
    assert list(node.gpus.values_list("index", "temperature_c", "utilization_pct")) == [
        (0, 61, 97),
        (1, None, None),
    ]


@pytest.mark.integration
@pytest.mark.postgres  # the integration tier needs it; SQLite's db pass skips nothing
def test_an_enrolment_that_rolls_back_announces_nothing(
    provider, own_channel_layer, django_capture_on_commit_callbacks
):
    token = create_enrollment_token(provider).token

    def enrol_then_fail():
        from django.db import transaction

        with django_capture_on_commit_callbacks(execute=True):
            try:
                with transaction.atomic():
                    enroll_node(
                        enroll_request(Identity.generate(), token, gpus=[gpu(0)]),
                        observed_ip=None,
                    )
                    raise RuntimeError("the caller failed after enrolling")
            except RuntimeError:
                pass

    assert owner_events(own_channel_layer, provider.pk, enrol_then_fail) == []
    assert not Node.objects.filter(owner=provider).exists()


# --- the provider websocket on the real ASGI server ---------------------------------------------


def session_cookie(user) -> str:
    browser = Client()
    browser.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return f"{name}={browser.cookies[name].value}"


async def next_frame(ws, timeout: float = 10) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


@pytest.mark.integration
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_provider_socket_hears_of_own_nodes_only_and_stops_at_logout(
    gateway, provider, stranger, settings
):
    # In-process writes announce through the gateway's Redis and channel prefix.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [gateway.env["REDIS_URL"]],
                "prefix": gateway.env["MOLT_CHANNEL_PREFIX"],
            },
        }
    }
    cookie = session_cookie(provider)
    url = gateway.base_url.replace("http://", "ws://") + "/ws/provider/"
    origin = gateway.base_url

    async def scenario():
        async with websockets.connect(
            url, additional_headers={"Cookie": cookie}, origin=origin
        ) as ws:
            assert (await next_frame(ws)) == {"type": "subscribed"}
            await database_sync_to_async(enrolled_node)(
                stranger
            )  # another provider's node: not heard
            mine = await database_sync_to_async(enrolled_node)(provider)
            frame = await next_frame(ws)
            assert frame == {"type": "node", "node": mine.pk, "change": "enrolled"}
            # Logging out deletes the session: the next event closes the feed.
            await database_sync_to_async(Client(HTTP_COOKIE=cookie).post)("/accounts/logout/")
            await database_sync_to_async(enrolled_node)(provider)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await next_frame(ws)
            assert closed.value.rcvd.code == 4401

    asyncio.run(scenario())


@pytest.mark.integration
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_provider_socket_refuses_visitors_and_other_sites(gateway, provider):
    url = gateway.base_url.replace("http://", "ws://") + "/ws/provider/"
    cookie = session_cookie(provider)

    async def scenario():
        async with websockets.connect(url, origin=gateway.base_url) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await next_frame(ws)
            assert closed.value.rcvd.code == 4401
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(
                url,
                additional_headers={"Cookie": cookie},
                origin="http://evil.example",
            ):
                pass

    asyncio.run(scenario())


# --- the install script and the agent package -------------------------------------------------


def test_the_install_script_names_this_gateway_and_the_wheel_it_serves(client, db):
    response = client.get("/install.sh")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/x-shellscript")
    script = response.content.decode()
    assert script.startswith("#!/bin/sh\n")
    assert "    set -eu\n" in script
    assert "GATEWAY=http://testserver\n" in script
    wheel_name = re.search(r"^\s*AGENT_WHEEL=(\S+)$", script, re.M).group(1)
    sha = re.search(r"^\s*AGENT_SHA256=([0-9a-f]{64})$", script, re.M).group(1)
    version = tomllib.loads((agent_source_dir() / "pyproject.toml").read_text())["project"][
        "version"
    ]
    assert wheel_name == f"clawnode-{version}-py3-none-any.whl"
    wheel = b"".join(client.get(f"/agent/{wheel_name}").streaming_content)
    assert hashlib.sha256(wheel).hexdigest() == sha
    assert f'href="{wheel_name}#sha256={sha}"' in client.get("/agent/").content.decode()
    assert client.get("/agent/clawnode-0.0.1-py3-none-any.whl").status_code == 404


def test_the_install_script_takes_the_scheme_and_host_it_was_asked_on(client, db, settings):
    settings.ALLOWED_HOSTS = ["molt.example"]

    script = client.get(
        "/install.sh", HTTP_HOST="molt.example", HTTP_X_FORWARDED_PROTO="https", secure=True
    ).content.decode()

    assert "GATEWAY=https://molt.example\n" in script


def test_the_agent_wheel_carries_the_agent_its_dependencies_and_its_command(tmp_path):
    wheel = agent_wheel(cache_root=tmp_path)
    project = tomllib.loads((agent_source_dir() / "pyproject.toml").read_text())["project"]

    with zipfile.ZipFile(wheel.path) as archive:
        names = set(archive.namelist())
        dist_info = f"clawnode-{project['version']}.dist-info"
        metadata = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        record = list(csv.reader(io.StringIO(archive.read(f"{dist_info}/RECORD").decode())))
        for name, digest, size in record:
            if name.endswith("RECORD"):
                continue
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data), name

    package = agent_source_dir() / "clawnode"
    sources = {f"clawnode/{path.relative_to(package).as_posix()}" for path in package.rglob("*.py")}
    assert sources and sources <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    assert {name for name, _, _ in record} == names
    assert metadata["Name"] == "clawnode" and metadata["Version"] == project["version"]
    assert metadata.get_all("Requires-Dist") == project["dependencies"]
    assert metadata["Requires-Python"] == project["requires-python"]
    assert "clawnode = clawnode.cli:main" in entry_points


def test_the_wheel_is_built_once_per_source_and_again_when_the_agent_changes(tmp_path):
    source = tmp_path / "provider_agent"
    shutil.copytree(
        agent_source_dir(), source, ignore=shutil.ignore_patterns("*.egg-info", ".mypy_cache")
    )
    cache = tmp_path / "cache"

    first = agent_wheel(source=source, cache_root=cache)
    built_at = first.path.stat().st_mtime_ns
    again = agent_wheel(source=source, cache_root=cache)
    assert again == first and again.path.stat().st_mtime_ns == built_at  # not rebuilt
    # A build elsewhere from the same sources gives the same bytes (any replica, same hash).
    assert agent_wheel(source=source, cache_root=tmp_path / "elsewhere").sha256 == first.sha256

    (source / "clawnode" / "__init__.py").write_text(
        (source / "clawnode" / "__init__.py").read_text() + "\n# changed\n"
    )
    changed = agent_wheel(source=source, cache_root=cache)
    assert changed.path != first.path and changed.sha256 != first.sha256
    with zipfile.ZipFile(changed.path) as archive:
        assert archive.read("clawnode/__init__.py").endswith(b"# changed\n")


def test_the_served_script_is_valid_posix_sh(client, db, tmp_path):
    path = tmp_path / "install.sh"
    path.write_bytes(client.get("/install.sh").content)

    result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    help_text = subprocess.run(["sh", str(path), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--no-systemd" in help_text.stdout


def test_the_script_refuses_an_unknown_option_before_doing_anything(client, db, tmp_path):
    path = tmp_path / "install.sh"
    path.write_bytes(client.get("/install.sh").content)

    result = subprocess.run(
        ["sh", str(path), "--token", "t", "--bogus"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "unknown option --bogus" in result.stderr
    assert "failed while reading the options" in result.stderr
    assert "[1/6]" not in result.stdout


def test_the_script_needs_a_token(client, db, tmp_path):
    path = tmp_path / "install.sh"
    path.write_bytes(client.get("/install.sh").content)

    result = subprocess.run(
        ["sh", str(path)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 1
    assert "no enrolment token" in result.stderr
