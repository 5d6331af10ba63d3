"""Multi-node orders in the admin: read-only, with their derived state; each part is an order
of the Orders page (stop it there, or stop the parts one by one)."""

from __future__ import annotations

from django.contrib import admin

from marketplace.admin.common import ReadableFields, money
from marketplace.cluster_models import Cluster
from marketplace.clusters import state_of
from meshnet.admin import ReadOnlyAdmin


@admin.register(Cluster)
class ClusterAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = ("id", "buyer", "derived_state", "on_part_loss", "hours", "hold", "created_at")
    list_filter = ("on_part_loss",)
    list_select_related = ("buyer",)
    search_fields = ("=id", "buyer__username")
    date_hierarchy = "created_at"
    hold = money("hold_amount", "hold")
    readable = {"hold_amount": "hold"}

    @admin.display(description="state")
    def derived_state(self, cluster: Cluster) -> str:
        return state_of(cluster)
