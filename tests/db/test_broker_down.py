"""A write that committed never answers 5xx because the broker is down (issue 15 item 2): the
enqueue after commit fails, is logged, and the beat sweep re-drives the work; the client gets
its normal answer, so a retry cannot book twice."""

from __future__ import annotations

import logging

import pytest
from kombu.exceptions import OperationalError

from marketplace import tasks as market_tasks
from marketplace.models import Order
from meshnet import tasks as mesh_tasks
from tests.factories import wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def broker_down(*args, **kwargs):
    raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_an_order_placed_while_the_broker_is_down_is_a_201_and_swept_later(
    api_client_for, funded_buyer, listing, monkeypatch, caplog, django_capture_on_commit_callbacks
):
    monkeypatch.setattr(market_tasks.provision_order, "delay", broker_down)
    body = {"listing": listing.pk, "gpu_count": 1, "hours": 1}

    with (
        caplog.at_level(logging.WARNING, logger="meshnet.enqueue"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = api_client_for(funded_buyer).post(
            "/api/v1/orders/", {**body, "wireguard_public_key": wg_public_key()}, format="json"
        )

    assert response.status_code == 201, response.content
    order = Order.objects.get(pk=response.json()["id"])
    assert order.state == Order.State.PENDING and order.hold.amount == order.hold_amount
    assert "broker unavailable" in caplog.text and "reprovision-pending" in caplog.text
    # The sweep the log names provisions it once the order has waited (here: at once).
    monkeypatch.undo()
    Order.objects.filter(pk=order.pk).update(created_at=order.created_at.replace(year=2000))
    market_tasks.sweep_pending_orders()
    order.refresh_from_db()
    assert order.state == Order.State.PROVISIONING


def test_a_desired_state_push_lost_to_the_broker_is_logged_not_raised(
    node, monkeypatch, caplog, django_capture_on_commit_callbacks
):
    from meshnet.peers import create_job_peer

    monkeypatch.setattr(mesh_tasks.push_desired_state, "delay", broker_down)

    with (
        caplog.at_level(logging.WARNING, logger="meshnet.enqueue"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        peer = create_job_peer(node, wg_public_key(), ref="order:999")

    assert peer.pk is not None
    assert "repush-lagging-nodes" in caplog.text
