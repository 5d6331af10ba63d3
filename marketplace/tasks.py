"""Thin Celery tasks: take ids, re-read, call one service; idempotent, enqueued on commit."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from marketplace import clusters, orders, payments, reliability, settlement, tokens
from marketplace.audit import record_audit_run
from marketplace.idempotency import purge_expired_keys
from marketplace.models import Order

log = logging.getLogger(__name__)


@shared_task(acks_late=True, autoretry_for=(ConnectionError,), retry_backoff=True, max_retries=5)
def provision_order(order_id: int) -> None:
    try:
        orders.provision_order(order_id)
    except Order.DoesNotExist:
        # Enqueued by a transaction that later rolled back, or a stale message: nothing to do.
        log.warning("provision_order: order %s does not exist", order_id)


@shared_task(acks_late=True)
def expire_orders() -> int:
    # Multi-node orders ended by a lost part whose other parts still live: the after-commit
    # end_cluster_after_loss was lost (broker down, worker crash).
    return orders.expire_orders() + clusters.sweep_lost_clusters()


@shared_task(acks_late=True, autoretry_for=(ConnectionError,), retry_backoff=True, max_retries=5)
def end_cluster_after_loss(cluster_id: int) -> int:
    return clusters.end_after_loss(cluster_id)


@shared_task(acks_late=True)
def sweep_pending_orders() -> int:
    """Re-drive orders still pending a while after placement (a lost broker message must delay
    provisioning, never lose it)."""
    cutoff = timezone.now() - timedelta(seconds=settings.MOLT_PENDING_SWEEP_AFTER_SECONDS)
    ids = list(
        Order.objects.filter(state="pending", created_at__lte=cutoff).values_list("pk", flat=True)
    )
    for order_id in ids:
        orders.provision_order(order_id)
    return len(ids)


@shared_task(acks_late=True)
def sweep_settlements() -> int:
    """Settle completed orders that have no settlement yet (a crash between the two)."""
    ids = list(
        Order.objects.filter(state__in=Order.COMPLETED_STATES, settlement__isnull=True).values_list(
            "pk", flat=True
        )
    )
    for order_id in ids:
        settlement.settle_order(Order.objects.get(pk=order_id))
    return len(ids)


@shared_task(acks_late=True)
def release_due_earnings() -> int:
    """Frozen provider shares whose dispute window passed go to the providers' earnings."""
    return payments.release_due_earnings()


@shared_task(acks_late=True)
def refresh_reliability() -> int:
    return reliability.refresh_reliability()


@shared_task(acks_late=True)
def purge_idempotency_keys() -> int:
    return purge_expired_keys()


@shared_task(acks_late=True)
def purge_expired_tokens() -> int:
    return tokens.purge_expired_tokens()


@shared_task(acks_late=True)
def audit_ledger() -> bool:
    """The hourly ledger audit; its result is kept as an AuditRun for the ops dashboard."""
    run = record_audit_run(source="beat")
    if not run.ok:
        log.error("ledger audit: %s violation(s):\n%s", run.violation_count, run.violations)
    return run.ok
