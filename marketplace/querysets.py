from __future__ import annotations

from django.db import models
from django.db.models import Q, Sum


class ListingQuerySet(models.QuerySet):
    def visible(self) -> ListingQuerySet:
        return self.filter(deleted_at__isnull=True)

    def available(self) -> ListingQuerySet:
        """Listings a buyer can order from now: active, not deleted, node not revoked."""
        return self.visible().filter(is_active=True, node__revoked_at__isnull=True)

    def owned_by(self, user) -> ListingQuerySet:
        return self.visible().filter(owner=user)


class OrderQuerySet(models.QuerySet):
    def for_buyer(self, user) -> OrderQuerySet:
        return self.filter(buyer=user)

    def live(self) -> OrderQuerySet:
        return self.filter(state__in=["pending", "provisioning", "running", "stopping"])

    def gpus_in_use(self, listing_id: int) -> int:
        return self.live().filter(listing_id=listing_id).aggregate(n=Sum("gpu_count"))["n"] or 0

    def involving(self, user) -> OrderQuerySet:
        return self.filter(Q(buyer=user) | Q(listing__owner=user))
