from django.contrib import admin

from marketplace.models import (
    Account,
    ApiToken,
    EscrowHold,
    LedgerEntry,
    LedgerTransaction,
    Listing,
    Order,
    OrderTransition,
    Settlement,
)


@admin.register(Listing)
class ListingAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "gpu_model",
        "gpu_count",
        "price_per_gpu_hour",
        "price_per_gib",
        "region",
        "node",
        "owner",
        "is_active",
    )
    list_filter = ("gpu_model", "region", "is_active", "simulated")
    search_fields = ("gpu_model", "node__name", "owner__username")


class TransitionInline(admin.TabularInline):
    model = OrderTransition
    extra = 0
    can_delete = False
    readonly_fields = ("from_state", "to_state", "reason", "created_at")


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "buyer",
        "listing",
        "gpu_count",
        "hours",
        "state",
        "hold_amount",
        "created_at",
    )
    list_filter = ("state",)
    search_fields = ("buyer__username", "wireguard_public_key")
    inlines = [TransitionInline]


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "user", "balance")
    list_filter = ("kind",)


class EntryInline(admin.TabularInline):
    model = LedgerEntry
    extra = 0
    can_delete = False
    readonly_fields = ("account", "amount")


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "memo", "created_at")
    list_filter = ("kind",)
    inlines = [EntryInline]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # append-only

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


admin.site.register(EscrowHold, list_display=("id", "order", "amount", "state", "resolved_at"))
admin.site.register(
    Settlement, list_display=("id", "order", "captured", "fee", "provider_amount", "released")
)
admin.site.register(
    ApiToken, list_display=("id", "user", "hint", "name", "created_at", "last_used_at")
)
