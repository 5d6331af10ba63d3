"""The table of multi-node orders (issue 16): a Cluster is one buyer's job across several
listings (nodes, possibly of several providers and regions). Each of its parts is an ordinary
Order on one listing (Order.cluster, Order.part_index) that runs the proven single-node
lifecycle; the cluster adds one escrow hold for the total (EscrowHold.cluster) and the buyer's
choice of what a lost part does. Its state is derived from its parts (marketplace.cluster_state),
never stored, so it cannot disagree with them.

Kept out of marketplace/models.py (which imports this module at its end, so Django registers
the model with the app) to keep that file small.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Cluster(models.Model):
    class OnPartLoss(models.TextChoices):
        END = "end", "a lost part ends the whole job"
        DEGRADE = "degrade", "the other parts keep running (and billing)"

    buyer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="clusters"
    )
    hours = models.PositiveIntegerField()
    on_part_loss = models.CharField(max_length=8, choices=OnPartLoss.choices)
    # The one hold's amount: the sum of the parts' quotes (each part's Order.hold_amount is its
    # share, the most its settlement may capture).
    hold_amount = models.BigIntegerField()
    # The buyer's one WireGuard key for every part: each part's node has it as the job's peer,
    # at one tunnel address (meshnet.key_claims), so one wg-quick file reaches every sandbox
    # (marketplace.cluster_tunnel). Multi-node orders placed before this had a key per part:
    # theirs is part 0's, and they keep a tunnel per part.
    wireguard_public_key = models.CharField(max_length=44)
    created_at = models.DateTimeField(default=timezone.now)
    # Set once (compare-and-set from NULL) when a lost part ended the job under
    # on_part_loss="end": the remaining parts are being stopped, and the job reads failed.
    ended_by_loss_at = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(hours__gte=1), name="cluster_hours_positive"),
            models.CheckConstraint(
                condition=Q(hold_amount__gte=0), name="cluster_hold_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(on_part_loss__in=["end", "degrade"]), name="cluster_loss_choice"
            ),
        ]

    def __str__(self) -> str:
        return f"cluster {self.pk} of {self.buyer}"
