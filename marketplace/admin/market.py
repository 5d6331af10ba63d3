"""Listings, orders and their transitions, settlements and node reliability in the admin."""

from __future__ import annotations

from django.contrib import admin, messages

from marketplace.admin.common import ReadableFields, byte_count, money, price
from marketplace.errors import MarketError
from marketplace.listings import update_listing
from marketplace.models import (
    Listing,
    NodeReliability,
    Order,
    OrderTransition,
    Settlement,
)
from marketplace.orders import stop_order
from meshnet.admin import ReadOnlyAdmin


class DeletedFilter(admin.SimpleListFilter):
    title = "deleted"
    parameter_name = "deleted"

    def lookups(self, request, model_admin):
        return [("no", "not deleted"), ("yes", "deleted")]

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(deleted_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(deleted_at__isnull=False)
        return queryset


@admin.register(Listing)
class ListingAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = (
        "id",
        "gpu_model",
        "gpu_count",
        "hour_price",
        "gib_price",
        "region",
        "node",
        "owner",
        "is_active",
        "simulated",
        "deleted_at",
    )
    list_filter = ("is_active", DeletedFilter, "simulated", "region", "gpu_model")
    list_select_related = ("node", "owner")
    search_fields = ("=id", "gpu_model", "node__name", "owner__username")
    actions = ["pause", "resume"]
    hour_price = price("price_per_gpu_hour", "per GPU-hour", "hour")
    gib_price = price("price_per_gib", "per GiB", "gib")
    readable = {"price_per_gpu_hour": "hour_price", "price_per_gib": "gib_price"}

    def has_pause_permission(self, request) -> bool:
        return request.user.has_perm("marketplace.change_listing")

    def _set_active(self, request, queryset, active: bool) -> None:
        changed = 0
        for listing in queryset.filter(deleted_at__isnull=True):
            try:
                update_listing(listing, is_active=active)
                changed += 1
            except MarketError as exc:
                self.message_user(request, f"#{listing.pk}: {exc}", messages.ERROR)
        self.message_user(request, f"{'Resumed' if active else 'Paused'} {changed} listing(s).")

    @admin.action(description="Pause selected listings (no new orders)", permissions=["pause"])
    def pause(self, request, queryset):
        self._set_active(request, queryset, False)

    @admin.action(description="Resume selected listings", permissions=["pause"])
    def resume(self, request, queryset):
        self._set_active(request, queryset, True)


class TransitionInline(admin.TabularInline):
    model = OrderTransition
    extra = 0
    can_delete = False
    readonly_fields = ("from_state", "to_state", "reason", "created_at")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Order)
class OrderAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = (
        "id",
        "buyer",
        "listing",
        "node",
        "gpu_count",
        "hours",
        "state",
        "hold",
        "received",
        "sent",
        "created_at",
        "ended_at",
        "reason",
    )
    list_filter = ("state",)
    list_select_related = ("buyer", "listing__node")
    search_fields = ("=id", "buyer__username", "wireguard_public_key", "listing__node__name")
    date_hierarchy = "created_at"
    inlines = [TransitionInline]
    actions = ["stop"]
    hold = money("hold_amount", "hold")
    received = byte_count("bytes_in", "received")
    sent = byte_count("bytes_out", "sent")
    order_price = price("price_per_gpu_hour", "per GPU-hour", "hour")
    order_gib_price = price("price_per_gib", "per GiB", "gib")
    allowance = byte_count("bandwidth_allowance_bytes", "bandwidth allowance")
    readable = {
        "price_per_gpu_hour": "order_price",
        "price_per_gib": "order_gib_price",
        "bandwidth_allowance_bytes": "allowance",
        "hold_amount": "hold",
        "bytes_in": "received",
        "bytes_out": "sent",
    }

    @admin.display(description="node", ordering="listing__node__name")
    def node(self, order: Order) -> str:
        return order.listing.node.name

    def has_stop_permission(self, request) -> bool:
        return request.user.has_perm("marketplace.change_order")

    @admin.action(description="Stop selected orders", permissions=["stop"])
    def stop(self, request, queryset):
        stopped = 0
        for order in queryset:
            try:
                stop_order(order, reason=f"stopped by operator {request.user}")
                stopped += 1
            except MarketError as exc:
                self.message_user(request, f"order {order.pk}: {exc}", messages.WARNING)
        self.message_user(request, f"Stopped {stopped} order(s).")


@admin.register(OrderTransition)
class OrderTransitionAdmin(ReadOnlyAdmin):
    list_display = ("order", "from_state", "to_state", "reason", "created_at")
    list_filter = ("to_state",)
    search_fields = ("=order__id", "reason")
    date_hierarchy = "created_at"


# --- the ledger ----------------------------------------------------------------------------------


@admin.register(Settlement)
class SettlementAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = (
        "id",
        "order",
        "billed_seconds",
        "time",
        "traffic",
        "bandwidth",
        "captured_usd",
        "fee_usd",
        "provider_usd",
        "released_usd",
        "created_at",
    )
    search_fields = ("=order__id", "order__buyer__username", "order__listing__owner__username")
    date_hierarchy = "created_at"
    time = money("time_charge", "time")
    bandwidth = money("bandwidth_charge", "bandwidth")
    captured_usd = money("captured", "captured")
    fee_usd = money("fee", "fee")
    provider_usd = money("provider_amount", "provider")
    released_usd = money("released", "released")
    traffic = byte_count("bandwidth_bytes", "traffic")
    readable = {
        "time_charge": "time",
        "bandwidth_bytes": "traffic",
        "bandwidth_charge": "bandwidth",
        "captured": "captured_usd",
        "fee": "fee_usd",
        "provider_amount": "provider_usd",
        "released": "released_usd",
    }


# --- API access -----------------------------------------------------------------------------------


@admin.register(NodeReliability)
class NodeReliabilityAdmin(ReadOnlyAdmin):
    list_display = ("node", "score", "jobs_completed", "jobs_failed", "uptime_bp", "updated_at")
    list_select_related = ("node",)
    search_fields = ("node__name",)
