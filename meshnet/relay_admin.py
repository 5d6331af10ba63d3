"""The operator's list of relays (docs/operations.md, "Running relays"): add one per relay
process, with its region, public address and port range; its token is shown once, on creation
or when re-issued (the action), and stored hashed."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count

from meshnet.models import Relay, RelayAllocation
from meshnet.relays import issue_relay_token, live_relays


@admin.register(Relay)
class RelayAdmin(admin.ModelAdmin):
    list_display = ("name", "region", "address", "ports", "enabled", "live", "pairs", "load")
    list_filter = ("region", "enabled")
    search_fields = ("name", "address", "token_prefix")
    fields = (
        ("name", "region"),
        "address",
        ("port_low", "port_high"),
        "enabled",
        ("token_prefix", "last_seen_at"),
        "last_status",
    )
    readonly_fields = ("token_prefix", "last_seen_at", "last_status")
    actions = ["reissue_tokens"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(pair_total=Count("allocations"))

    @admin.display(description="ports")
    def ports(self, relay: Relay) -> str:
        return f"{relay.port_low}-{relay.port_high}"

    @admin.display(description="pairs", ordering="pair_total")
    def pairs(self, relay: Relay) -> int:
        return relay.pair_total

    @admin.display(boolean=True, description="live")
    def live(self, relay: Relay) -> bool:
        return live_relays().filter(pk=relay.pk).exists()

    @admin.display(description="bytes forwarded (last report)")
    def load(self, relay: Relay) -> int:
        return sum(entry.get("bytes", 0) for entry in relay.last_status.get("pairs", []))

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            self._show_token(request, obj, issue_relay_token(obj))

    @admin.action(description="Issue a new token (the old one stops working)")
    def reissue_tokens(self, request, queryset) -> None:
        for relay in queryset:
            self._show_token(request, relay, issue_relay_token(relay))

    def _show_token(self, request, relay: Relay, token: str) -> None:
        messages.warning(
            request,
            f"Token of relay {relay.name}, shown once; put it in the relay's --token-file: {token}",
        )


@admin.register(RelayAllocation)
class RelayAllocationAdmin(admin.ModelAdmin):
    # The upgrade columns: an upgrade to direct under way, or one that did not take
    # (meshnet.relays.settle_upgrades).
    list_display = (
        "job_peer",
        "relay",
        "buyer_port",
        "provider_port",
        "created_at",
        "upgrade_started_at",
        "upgrade_failed_at",
    )
    list_filter = ("relay",)
    list_select_related = ("relay", "job_peer")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
