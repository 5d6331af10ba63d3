"""The table of offers: a Listing is GPUs of one node at a price, with what a job on it gets.

Kept out of marketplace/models.py (which imports it, so Django registers the model with the
app) to keep that file under 600 lines; callers import it from marketplace.models.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from marketplace.money import MAX_PRICE
from marketplace.querysets import ListingQuerySet

# Listings a buyer may see, as the partial indexes below cover them.
ON_OFFER = Q(deleted_at__isnull=True, is_active=True)


class Listing(models.Model):
    """GPUs of one node offered at a price. The GPU model comes from the node's inventory."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="listings"
    )
    node = models.ForeignKey("meshnet.Node", on_delete=models.PROTECT, related_name="listings")
    gpu_model = models.CharField(max_length=100)
    vram_gb = models.PositiveIntegerField()
    gpu_count = models.PositiveIntegerField()
    price_per_gpu_hour = models.BigIntegerField(help_text="micro-USD per GPU-hour")
    price_per_gib = models.BigIntegerField(help_text="micro-USD per GiB of tunnel traffic")
    region = models.CharField(max_length=16, blank=True)
    simulated = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    deleted_at = models.DateTimeField(null=True, blank=True)
    # What a job gets (docs/provider.md): the images a buyer may pick (each one the node reports
    # it can run; the first is the default), and per GPU ordered, CPU and memory; disk per job;
    # whether the job's sandbox may reach the internet (through NAT behind the node).
    images = models.JSONField(default=list, blank=True)
    cpus_per_gpu = models.PositiveIntegerField(default=4)
    memory_gb_per_gpu = models.PositiveIntegerField(default=16)
    disk_gb = models.PositiveIntegerField(default=50)
    egress = models.BooleanField(default=True)

    objects = ListingQuerySet.as_manager()

    class Meta:
        ordering = ["price_per_gpu_hour", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="listing_gpus_positive"),
            models.CheckConstraint(
                condition=Q(price_per_gpu_hour__gte=0), name="listing_price_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(price_per_gib__gte=0), name="listing_gib_price_non_negative"
            ),
            # The ceiling every write path checks (marketplace.money.MAX_PRICE), in the
            # database too, so no row can make a hold or a settlement overflow (issue 15).
            models.CheckConstraint(
                condition=Q(price_per_gpu_hour__lte=MAX_PRICE), name="listing_price_at_most_max"
            ),
            models.CheckConstraint(
                condition=Q(price_per_gib__lte=MAX_PRICE), name="listing_gib_price_at_most_max"
            ),
        ]
        # The market's orders (marketplace.market.SORTS), each with its id tie-break, over
        # the rows on offer only (ON_OFFER): a keyset page walks one of these from its cursor.
        indexes = [
            models.Index(
                fields=["gpu_model", "price_per_gpu_hour"], name="listing_model_price_idx"
            ),
            models.Index(
                fields=["price_per_gpu_hour", "id"], condition=ON_OFFER, name="offer_price_idx"
            ),
            models.Index(
                fields=["price_per_gib", "id"], condition=ON_OFFER, name="offer_gib_price_idx"
            ),
            models.Index(fields=["vram_gb", "id"], condition=ON_OFFER, name="offer_vram_idx"),
            models.Index(fields=["gpu_count", "id"], condition=ON_OFFER, name="offer_gpus_idx"),
            models.Index(
                fields=["region", "price_per_gpu_hour", "id"],
                condition=ON_OFFER,
                name="offer_region_price_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.gpu_count} x {self.gpu_model} on {self.node}"
