"""Thin Celery tasks: take ids, re-read, call one service; idempotent, enqueued on commit."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from marketplace import services
from marketplace.models import Order

log = logging.getLogger(__name__)


@shared_task(acks_late=True, autoretry_for=(ConnectionError,), retry_backoff=True, max_retries=5)
def provision_order(order_id: int) -> None:
    try:
        services.provision_order(order_id)
    except Order.DoesNotExist:
        # Enqueued by a transaction that later rolled back, or a stale message: nothing to do.
        log.warning("provision_order: order %s does not exist", order_id)


@shared_task(acks_late=True)
def expire_orders() -> int:
    return services.expire_orders()


@shared_task(acks_late=True)
def sweep_pending_orders() -> int:
    """Re-drive orders still pending a while after placement (a lost broker message must delay
    provisioning, never lose it)."""
    cutoff = timezone.now() - timedelta(seconds=20)
    ids = list(
        Order.objects.filter(state="pending", created_at__lte=cutoff).values_list("pk", flat=True)
    )
    for order_id in ids:
        services.provision_order(order_id)
    return len(ids)


@shared_task(acks_late=True)
def sweep_settlements() -> int:
    """Settle completed orders that have no settlement yet (a crash between the two)."""
    ids = list(
        Order.objects.filter(state="completed", settlement__isnull=True).values_list(
            "pk", flat=True
        )
    )
    for order_id in ids:
        services.settle_order(Order.objects.get(pk=order_id))
    return len(ids)
