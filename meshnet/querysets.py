from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class NodeQuerySet(models.QuerySet):
    def owned_by(self, user) -> NodeQuerySet:
        return self.filter(owner=user)

    def active(self) -> NodeQuerySet:
        return self.filter(revoked_at__isnull=True)

    def online(self) -> NodeQuerySet:
        cutoff = timezone.now() - timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
        return self.active().filter(last_seen_at__gte=cutoff)

    def lagging(self) -> NodeQuerySet:
        """Nodes whose agent has not acknowledged the latest desired state."""
        return self.active().filter(acked_revision__lt=models.F("desired_revision"))


class JobPeerQuerySet(models.QuerySet):
    def live(self) -> JobPeerQuerySet:
        return self.exclude(state="removed")

    def in_desired_state(self) -> JobPeerQuerySet:
        """Peers the node should have now (removing ones are already gone from desired)."""
        return self.filter(state__in=["desired", "active"])
