"""The operators' admin: every model is there and its list works; granting credits (with its
intermediate form) moves money once; revoking a node cuts its agent off and fails its live
orders with their holds released."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import timedelta

import pytest
import websockets
from channels.db import database_sync_to_async
from clawnode import wire
from clawnode.keys import Identity
from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from marketplace import ledger
from marketplace.audit import audit_ledger
from marketplace.listings import create_listing
from marketplace.models import EscrowHold, LedgerTransaction, Listing, Order
from marketplace.orders import place_order, provision_order
from meshnet.agent_channel import AgentRefused, acknowledge_revision, authenticate_agent
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.models import IpAllocation, JobPeer, Node
from tests.factories import USD, enroll_request, gpu, staff_login, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

CHANGELIST = "/admin/auth/user/"
NODES = "/admin/meshnet/node/"


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser(
        "operator", "operator@example.com", "operator-pass-123"
    )


@pytest.fixture
def ops(operator):
    browser = Client()
    staff_login(browser, operator)
    return browser


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]] if response.context else []


# --- every model, every list ----------------------------------------------------------------------


def test_every_model_of_the_mesh_and_the_market_is_in_the_admin():
    missing = [
        model._meta.label
        for app in ("meshnet", "marketplace")
        for model in apps.get_app_config(app).get_models()
        if not admin.site.is_registered(model)
    ]
    assert missing == []


def test_every_admin_list_renders_with_its_filters_and_search(ops, provider, buyer):
    node = enroll(provider)
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0
    )
    ledger.grant_credits(buyer, 50 * USD)
    place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=wg_public_key()
    )

    for model, model_admin in admin.site._registry.items():
        url = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        query = "?q=a" if model_admin.search_fields else ""
        response = ops.get(url + query)
        assert response.status_code == 200, (url, response.status_code)
        # The first filter's first choice works too.
        for spec in response.context["cl"].filter_specs[:1]:
            choices = list(spec.choices(response.context["cl"]))
            if len(choices) > 1:
                assert ops.get(url + choices[1]["query_string"]).status_code == 200, url


def test_money_rows_cannot_be_edited_in_the_admin(ops, buyer):
    txn = ledger.grant_credits(buyer, 5 * USD)

    response = ops.post(f"/admin/marketplace/ledgertransaction/{txn.pk}/change/", {"memo": "x"})
    assert response.status_code == 403
    assert ops.get("/admin/marketplace/account/add/").status_code == 403
    assert ops.post(f"/admin/marketplace/ledgertransaction/{txn.pk}/delete/").status_code == 403


# --- grant credits ----------------------------------------------------------------------------


def ask_to_grant(browser, users) -> str:
    """Choose the action on the user list: the intermediate page, with its form's nonce."""
    response = browser.post(
        CHANGELIST, {"action": "grant_credits", "_selected_action": [u.pk for u in users]}
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "Grant credits" in html
    return re.search(r'name="nonce" value="([^"]+)"', html).group(1)


def grant(browser, users, nonce: str, amount: str = "25.50", memo: str = "welcome credits"):
    return browser.post(
        CHANGELIST,
        {
            "action": "grant_credits",
            "_selected_action": [u.pk for u in users],
            "apply": "1",
            "amount": amount,
            "memo": memo,
            "nonce": nonce,
        },
        follow=True,
    )


def grants_to(user) -> int:
    return LedgerTransaction.objects.filter(kind="grant", entries__account__user=user).count()


def test_granting_credits_asks_for_the_amount_then_credits_each_selected_user(
    ops, buyer, stranger, provider
):
    nonce = ask_to_grant(ops, [buyer, stranger])

    response = grant(ops, [buyer, stranger], nonce)

    assert response.status_code == 200
    assert "Granted $25.50 to each of: alice, mallory." in messages_of(response)
    assert ledger.available_for(buyer) == ledger.available_for(stranger) == 25_500_000
    assert ledger.available_for(provider) == 0  # not selected
    txn = LedgerTransaction.objects.get(kind="grant", entries__account__user=buyer)
    assert txn.memo == "welcome credits (by operator)"
    assert audit_ledger() == []


def test_the_same_grant_form_submitted_twice_moves_money_once(ops, buyer):
    nonce = ask_to_grant(ops, [buyer])

    grant(ops, [buyer], nonce)
    again = grant(ops, [buyer], nonce)

    assert any("already made" in message for message in messages_of(again))
    assert ledger.available_for(buyer) == 25_500_000
    assert grants_to(buyer) == 1
    # A new form (a new nonce) is a new grant.
    grant(ops, [buyer], ask_to_grant(ops, [buyer]), amount="1")
    assert ledger.available_for(buyer) == 26_500_000
    assert audit_ledger() == []


@pytest.mark.parametrize("amount", ["0", "-5", "0.0000001", "lots", "2000000"])
def test_a_bad_amount_is_refused_on_the_form_and_moves_nothing(ops, buyer, amount):
    nonce = ask_to_grant(ops, [buyer])

    response = grant(ops, [buyer], nonce, amount=amount)

    assert 'name="amount"' in response.content.decode()  # the form again, with its error
    assert 'class="errorlist' in response.content.decode()
    assert grants_to(buyer) == 0


def test_staff_without_the_ledger_permission_cannot_grant(buyer, django_user_model):
    clerk = django_user_model.objects.create_user("clerk", password="clerk-pass-123", is_staff=True)
    clerk.user_permissions.add(
        Permission.objects.get(codename="view_user"), Permission.objects.get(codename="change_user")
    )
    browser = Client()
    staff_login(browser, clerk)

    assert "grant_credits" not in browser.get(CHANGELIST).content.decode()
    grant(browser, [buyer], "forged-nonce")
    assert grants_to(buyer) == 0


def test_a_visitor_or_a_non_staff_user_cannot_reach_the_action(client, buyer):
    client.force_login(buyer)

    response = client.post(CHANGELIST, {"action": "grant_credits", "_selected_action": [buyer.pk]})

    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert grants_to(buyer) == 0


# --- reverse a grant ----------------------------------------------------------------------------

TRANSACTIONS = "/admin/marketplace/ledgertransaction/"


def reverse(browser, txn, why="granted to the wrong account", apply=True):
    data = {"action": "reverse", "_selected_action": [txn.pk], "text": why}
    if apply:
        data["apply"] = "1"
    return browser.post(TRANSACTIONS, data, follow=True)


def test_an_operator_reverses_a_grant_once_after_saying_why(ops, buyer):
    txn = ledger.grant_credits(buyer, 7 * USD, memo="oops")

    page = reverse(ops, txn, apply=False)
    assert f"Reverse transaction #{txn.pk}" in page.content.decode()
    assert ledger.available_for(buyer) == 7 * USD  # asking moves nothing

    done = reverse(ops, txn)
    again = reverse(ops, txn)

    reversal = LedgerTransaction.objects.get(kind="reversal")
    assert f"Transaction #{txn.pk} reversed by #{reversal.pk}." in messages_of(done)
    assert reversal.reverses_id == txn.pk
    assert "granted to the wrong account (by operator)" in reversal.memo
    assert "already reversed" in again.content.decode()  # the form again, with the refusal
    assert LedgerTransaction.objects.filter(kind="reversal").count() == 1
    assert ledger.available_for(buyer) == 0
    assert audit_ledger() == []


def test_reversal_needs_a_reason_and_a_single_selection(ops, buyer):
    first = ledger.grant_credits(buyer, 2 * USD, memo="a")
    second = ledger.grant_credits(buyer, 3 * USD, memo="b")

    blank = reverse(ops, first, why="   ")
    both = ops.post(
        TRANSACTIONS,
        {"action": "reverse", "_selected_action": [first.pk, second.pk], "apply": "1", "text": "x"},
        follow=True,
    )

    assert "Select exactly one transaction." in messages_of(both)
    assert 'class="errorlist' in blank.content.decode()
    assert not LedgerTransaction.objects.filter(kind="reversal").exists()
    assert ledger.available_for(buyer) == 5 * USD


def test_staff_without_the_ledger_permission_cannot_reverse(buyer, django_user_model):
    txn = ledger.grant_credits(buyer, 2 * USD, memo="a")
    clerk = django_user_model.objects.create_user("clerk", password="clerk-pass-123", is_staff=True)
    clerk.user_permissions.add(Permission.objects.get(codename="view_ledgertransaction"))
    browser = Client()
    staff_login(browser, clerk)

    assert 'value="reverse"' not in browser.get(TRANSACTIONS).content.decode()
    reverse(browser, txn)
    assert not LedgerTransaction.objects.filter(kind="reversal").exists()


# --- revoke a node --------------------------------------------------------------------------------


def enroll(owner, identity: Identity | None = None) -> Node:
    identity = identity or Identity.generate()
    token = create_enrollment_token(owner).token
    return enroll_node(
        enroll_request(identity, token, gpus=[gpu(0), gpu(1), gpu(2)]), observed_ip="203.0.113.8"
    ).node


def live_orders(provider, buyer, node) -> tuple[Order, Order]:
    """A running order and a pending one on `node`, each with an open hold."""
    listing = create_listing(
        provider, node=node, gpu_count=3, price_per_gpu_hour=2 * USD, price_per_gib=10_000
    )
    ledger.grant_credits(buyer, 1_000 * USD)
    running = place_order(
        buyer, listing_id=listing.pk, gpu_count=2, hours=3, wireguard_public_key=wg_public_key()
    )
    provision_order(running.pk)
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=timezone.now() - timedelta(minutes=30))
    pending = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=wg_public_key()
    )
    running.refresh_from_db()
    assert (running.state, pending.state) == ("running", "pending")
    return running, pending


def revoke(browser, nodes, reason: str = "stolen machine"):
    return browser.post(
        NODES,
        {
            "action": "revoke_nodes",
            "_selected_action": [n.pk for n in nodes],
            "apply": "1",
            "reason": reason,
        },
        follow=True,
    )


def test_revoking_a_node_fails_its_live_orders_and_releases_their_holds(ops, provider, buyer):
    node = enroll(provider)
    running, pending = live_orders(provider, buyer, node)
    peer = JobPeer.objects.get(ref=f"order:{running.pk}")
    confirm = ops.post(NODES, {"action": "revoke_nodes", "_selected_action": [node.pk]})
    assert confirm.status_code == 200 and node.name in confirm.content.decode()
    assert Node.objects.get(pk=node.pk).revoked_at is None  # nothing before the confirmation

    response = revoke(ops, [node])

    assert f"Revoked 1 node(s): {node.name}." in messages_of(response)
    node.refresh_from_db()
    assert node.revoked_at is not None
    for order in (running, pending):
        order.refresh_from_db()
        assert order.state == "failed"
        assert "provider node revoked: stolen machine (operator)" in order.reason
        assert order.hold.state == EscrowHold.State.RELEASED
    assert ledger.available_for(buyer) == 1_000 * USD  # every hold came back in full
    assert ledger.held_for(buyer) == 0
    peer.refresh_from_db()
    assert peer.state == JobPeer.State.REMOVED
    assert IpAllocation.objects.get(pk=peer.allocation_id).released_at is not None
    assert not Listing.objects.available().filter(node=node).exists()
    assert audit_ledger() == []


def test_a_revoked_node_cannot_authenticate_again(ops, provider):
    identity = Identity.generate()
    node = enroll(provider, identity)
    revoke(ops, [node])

    body = wire.AgentAuth(
        node_id=identity.node_id, challenge="c" * 43, timestamp=int(time.time())
    ).to_dict()
    with pytest.raises(AgentRefused) as refused:
        authenticate_agent(
            wire.signed_envelope(wire.AGENT_AUTH, body, identity), challenge="c" * 43
        )
    assert refused.value.close_code == wire.CLOSE_FORBIDDEN


def test_revoking_twice_says_so_and_moves_nothing_more(ops, provider, buyer):
    node = enroll(provider)
    live_orders(provider, buyer, node)
    revoke(ops, [node])
    revoked_at = Node.objects.get(pk=node.pk).revoked_at
    transactions = LedgerTransaction.objects.count()

    again = revoke(ops, [node])

    assert any("already revoked" in message for message in messages_of(again))
    assert Node.objects.get(pk=node.pk).revoked_at == revoked_at
    assert LedgerTransaction.objects.count() == transactions


# --- the agent of a revoked node, over the real websocket ---------------------------------------


async def agent_session(gateway, identity: Identity):
    ws = await websockets.connect(gateway.base_url.replace("http://", "ws://") + "/ws/agent/")
    challenge = json.loads(await ws.recv())
    body = wire.AgentAuth(
        node_id=identity.node_id, challenge=challenge["challenge"], timestamp=int(time.time())
    ).to_dict()
    envelope = wire.signed_envelope(wire.AGENT_AUTH, body, identity)
    await ws.send(json.dumps({"type": "auth", "envelope": envelope}))
    kinds = set()
    while kinds != {"welcome", "desired_state"}:
        kinds.add(json.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
    return ws


async def refusal(ws, node_id: str) -> tuple[dict, int]:
    """The error frame the gateway sends before it closes, and the close code; and before them
    the gateway's signed refusal of `node_id`, the only thing that stops an agent for good."""
    frames = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    (refused,) = [frame for frame in frames if frame.get("type") == "refused"]
    assert refused["envelope"]["kind"] == wire.REFUSAL
    assert wire.Refusal.from_dict(refused["envelope"]["body"]).node_id == node_id
    errors = [frame for frame in frames if frame.get("type") == "error"]
    return errors[-1], closed.value.rcvd.code


@pytest.mark.integration
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_agent_of_a_revoked_node_is_cut_off_and_its_next_frame_refused(
    gateway, provider, settings, django_user_model
):
    operator = django_user_model.objects.create_superuser("operator", "o@example.com", "pw-123-xyz")
    ops = Client()
    staff_login(ops, operator)
    told, silent = Identity.generate(), Identity.generate()
    told_node, silent_node = enroll(provider, told), enroll(provider, silent)

    async def scenario():
        told_ws = await agent_session(gateway, told)
        silent_ws = await agent_session(gateway, silent)

        # Revoked with this process's channel layer on the gateway's Redis: the push reaches
        # the agent's connection, which the gateway closes at once.
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {
                    "hosts": [gateway.env["REDIS_URL"]],
                    "prefix": gateway.env["MOLT_CHANNEL_PREFIX"],
                },
            }
        }
        await database_sync_to_async(revoke)(ops, [told_node])
        error, code = await refusal(told_ws, told.node_id)
        assert (error["detail"], code) == ("node revoked", wire.CLOSE_FORBIDDEN)

        # Revoked where no push can reach it (another channel prefix): the agent's next frame
        # is refused all the same, by the check every frame gets.
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {"hosts": [gateway.env["REDIS_URL"]], "prefix": "elsewhere"},
            }
        }
        await database_sync_to_async(revoke)(ops, [silent_node])
        await silent_ws.send(json.dumps({"type": "heartbeat"}))
        error, code = await refusal(silent_ws, silent.node_id)
        assert (error["detail"], code) == ("node revoked", wire.CLOSE_FORBIDDEN)

    asyncio.run(scenario())
    assert Node.objects.filter(pk__in=[told_node.pk, silent_node.pk], revoked_at=None).count() == 0
