"""The mesh in the Django admin. Rows are read-only here: nodes, peers and leases change
through meshnet's services (an operator revokes a node with the action below), never by editing a
row, which would skip the locks, the desired-state revision and the agent's notification.
A node's region too: the provider declares it at `clawnode join --region`, its mesh address is in
that region's block and its listings carry it, so it is not edited here."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import Count, F, Q, Sum
from django.template.response import TemplateResponse
from django.utils import timezone

from meshnet import ipplan
from meshnet.models import (
    EnrollmentToken,
    Gpu,
    IpAllocation,
    IpPool,
    JobPeer,
    JobPeerKey,
    MeteringSample,
    Node,
    NodeOutage,
    PeerKeyClaim,
    Sandbox,
    SandboxGpu,
    UsedNonce,
)
from meshnet.nodes import revoke_node
from meshnet.units import format_bytes


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only: rows are written by services, the admin only shows them."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class GpuInline(admin.TabularInline):
    model = Gpu
    extra = 0
    can_delete = False
    fields = (
        "index",
        "name",
        "memory_mb",
        "driver_version",
        "cuda_version",
        "temperature_c",
        "utilization_pct",
        "simulated",
        "updated_at",
    )
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class OnlineFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [
            ("online", "online"),
            ("offline", "offline"),
            ("never", "never seen"),
            ("revoked", "revoked"),
            ("lagging", "lagging (unacknowledged desired state)"),
        ]

    def queryset(self, request, queryset):
        cutoff = timezone.now() - timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
        active = queryset.filter(revoked_at__isnull=True)
        match self.value():
            case "online":
                return active.filter(last_seen_at__gte=cutoff)
            case "offline":
                return active.filter(Q(last_seen_at__lt=cutoff) | Q(last_seen_at__isnull=True))
            case "never":
                return active.filter(last_seen_at__isnull=True)
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
            case "lagging":
                return active.filter(acked_revision__lt=F("desired_revision"))
        return queryset


class RevokeForm(forms.Form):
    reason = forms.CharField(
        max_length=150,
        initial="revoked by an operator",
        help_text="Recorded on the failed orders and in the log.",
    )


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "status",
        "mesh_address",
        "hostname",
        "region",
        "gpu_count",
        "last_seen_at",
        "revision",
        "last_report",
    )
    list_filter = (OnlineFilter, "region", "gpus__simulated")
    list_select_related = ("owner",)
    search_fields = (
        "name",
        "hostname",
        "node_id",
        "mesh_address",
        "observed_ip",
        "owner__username",
        "identity_public_key",
        "wireguard_public_key",
    )
    date_hierarchy = "enrolled_at"
    fields = (
        ("name", "node_id"),
        "owner",
        "region",
        ("mesh_address", "allocation"),
        ("hostname", "observed_ip", "listen_port", "declared_endpoint"),
        ("observed_endpoint", "observed_endpoint_at"),
        ("identity_public_key", "wireguard_public_key"),
        ("enrolled_at", "last_seen_at", "revoked_at"),
        ("desired_revision", "acked_revision"),
        ("last_report", "last_report_at"),
    )
    readonly_fields = tuple(
        name for row in fields for name in (row if isinstance(row, tuple) else (row,))
    )
    inlines = [GpuInline]
    actions = ["revoke_nodes"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(gpu_total=Count("gpus", distinct=True))

    @admin.display(description="GPUs", ordering="gpu_total")
    def gpu_count(self, node: Node) -> int:
        return node.gpu_total

    @admin.display(description="status")
    def status(self, node: Node) -> str:
        if node.revoked_at is not None:
            return "revoked"
        if node.last_seen_at is None:
            return "never seen"
        return "online" if node.online else "offline"

    @admin.display(description="acked / desired")
    def revision(self, node: Node) -> str:
        return f"{node.acked_revision} / {node.desired_revision}"

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # nodes enrol themselves (clawnode join)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # revoke instead: orders, peers and leases point at the node

    @admin.action(
        description="Revoke selected nodes (cut off; their live orders fail, holds released)",
        permissions=["change"],
    )
    def revoke_nodes(self, request, queryset):
        """Asks for a reason first (an intermediate page), then calls revoke_node for
        each node: its agent is disconnected and refused from then on, and marketplace fails
        its live orders with their holds released in full."""
        if "apply" in request.POST:
            form = RevokeForm(request.POST)
            if form.is_valid():
                reason = f"{form.cleaned_data['reason']} ({request.user.get_username()})"
                revoked = [node.name for node in queryset if revoke_node(node, reason)]
                skipped = queryset.count() - len(revoked)
                if revoked:
                    self.message_user(
                        request, f"Revoked {len(revoked)} node(s): {', '.join(revoked)}."
                    )
                if skipped:
                    self.message_user(
                        request,
                        f"{skipped} node(s) were already revoked (their clean-up was re-run).",
                        messages.WARNING,
                    )
                return None
        else:
            form = RevokeForm()
        live_peers = JobPeer.objects.filter(node__in=queryset).live().count()
        return TemplateResponse(
            request,
            "frontend/ops/revoke_nodes.html",
            {
                **self.admin_site.each_context(request),
                "title": "Revoke nodes",
                "opts": self.model._meta,
                "nodes": queryset,
                "live_peers": live_peers,
                "form": form,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            },
        )


@admin.register(Gpu)
class GpuAdmin(ReadOnlyAdmin):
    list_display = (
        "node",
        "index",
        "name",
        "memory_mb",
        "driver_version",
        "cuda_version",
        "temperature_c",
        "utilization_pct",
        "simulated",
        "updated_at",
    )
    list_filter = ("simulated", "name")
    list_select_related = ("node",)
    search_fields = ("node__name", "name", "uuid")


KEY_COLUMNS = (
    "public_key",
    "epoch",
    "received",
    "sent",
    "active_from",
    "added_revision",
    "retired_at",
    "retired_revision",
    "closed_at",
    "last_sample_at",
)


class KeyTraffic:
    """A key's byte totals as `103.1 MiB`, for the key columns."""

    @admin.display(description="received", ordering="total_rx_bytes")
    def received(self, key: JobPeerKey) -> str:
        return format_bytes(key.total_rx_bytes)

    @admin.display(description="sent", ordering="total_tx_bytes")
    def sent(self, key: JobPeerKey) -> str:
        return format_bytes(key.total_tx_bytes)


class JobPeerKeyInline(KeyTraffic, admin.TabularInline):
    """Every key the peer has had (a re-key retires one and adds the next), with its bytes."""

    model = JobPeerKey
    extra = 0
    can_delete = False
    fields = KEY_COLUMNS
    readonly_fields = KEY_COLUMNS

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(JobPeer)
class JobPeerAdmin(ReadOnlyAdmin):
    list_display = (
        "ref",
        "node",
        "address",
        "state",
        "added_revision",
        "created_at",
        "acked_at",
        "removed_at",
        "key_count",
        "rx_bytes",
        "tx_bytes",
    )
    list_filter = ("state",)
    list_select_related = ("node",)
    search_fields = ("ref", "public_key", "keys__public_key", "address", "node__name")
    date_hierarchy = "created_at"
    inlines = [JobPeerKeyInline]

    def get_queryset(self, request):
        # Totals over all the peer's keys, in the list's one query.
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_keys=Count("keys"),
                rx_total=Sum("keys__total_rx_bytes"),
                tx_total=Sum("keys__total_tx_bytes"),
            )
        )

    @admin.display(description="keys", ordering="n_keys")
    def key_count(self, peer: JobPeer) -> int:
        return peer.n_keys

    @admin.display(description="received (all keys)", ordering="rx_total")
    def rx_bytes(self, peer: JobPeer) -> str:
        return format_bytes(peer.rx_total or 0)

    @admin.display(description="sent (all keys)", ordering="tx_total")
    def tx_bytes(self, peer: JobPeer) -> str:
        return format_bytes(peer.tx_total or 0)


class KeyStateFilter(admin.SimpleListFilter):
    title = "key"
    parameter_name = "key"

    def lookups(self, request, model_admin):
        return [
            ("current", "current"),
            ("retired_open", "retired, final counters to come"),
            ("closed", "closed"),
        ]

    def queryset(self, request, queryset):
        if self.value() == "current":
            return queryset.filter(retired_at__isnull=True)
        if self.value() == "retired_open":
            return queryset.filter(retired_at__isnull=False, closed_at__isnull=True)
        if self.value() == "closed":
            return queryset.filter(closed_at__isnull=False)
        return queryset


@admin.register(JobPeerKey)
class JobPeerKeyAdmin(KeyTraffic, ReadOnlyAdmin):
    """The metering base and totals of each key of each peer: a re-keyed peer has several."""

    list_display = ("job_peer", *KEY_COLUMNS)
    list_filter = (KeyStateFilter,)
    list_select_related = ("job_peer__node",)
    search_fields = ("public_key", "job_peer__ref", "job_peer__node__name")
    date_hierarchy = "active_from"


@admin.register(PeerKeyClaim)
class PeerKeyClaimAdmin(ReadOnlyAdmin):
    """Which job each buyer key is live in (a multi-node order's parts share one), with that
    group's one tunnel address; a claim no live peer holds is free for the next job."""

    list_display = ("public_key", "group", "allocation")
    list_select_related = ("allocation",)
    search_fields = ("=public_key", "group")


@admin.register(MeteringSample)
class MeteringSampleAdmin(ReadOnlyAdmin):
    list_display = ("node", "boot_id", "seq", "sampled_at", "received_at")
    list_select_related = ("node",)
    search_fields = ("node__name", "boot_id")
    date_hierarchy = "received_at"


@admin.register(IpPool)
class IpPoolAdmin(ReadOnlyAdmin):
    list_display = ("name", "cidr", "next_offset", "size", "leased")

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(live=Count("allocations", filter=Q(allocations__released_at__isnull=True)))
        )

    @admin.display(description="usable addresses")
    def size(self, pool: IpPool) -> int:
        return ipplan.usable_count(pool.network)

    @admin.display(description="leased now", ordering="live")
    def leased(self, pool: IpPool) -> str:
        size = ipplan.usable_count(pool.network)
        return f"{pool.live} ({100 * pool.live / size:.2f} %)" if size else str(pool.live)


class LeaseFilter(admin.SimpleListFilter):
    title = "lease"
    parameter_name = "lease"

    def lookups(self, request, model_admin):
        return [("live", "in use"), ("quarantine", "in quarantine"), ("free", "reusable")]

    def queryset(self, request, queryset):
        now = timezone.now()
        match self.value():
            case "live":
                return queryset.filter(released_at__isnull=True)
            case "quarantine":
                return queryset.filter(reusable_after__gt=now)
            case "free":
                return queryset.filter(reusable_after__lte=now)
        return queryset


@admin.register(IpAllocation)
class IpAllocationAdmin(ReadOnlyAdmin):
    list_display = ("address", "pool", "purpose", "allocated_at", "released_at", "reusable_after")
    list_filter = ("pool", "purpose", LeaseFilter)
    list_select_related = ("pool",)
    search_fields = ("address",)


class TokenStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("unused", "unused"), ("used", "used"), ("expired", "expired unused")]

    def queryset(self, request, queryset):
        now = timezone.now()
        match self.value():
            case "unused":
                return queryset.filter(used_at__isnull=True, expires_at__gt=now)
            case "used":
                return queryset.filter(used_at__isnull=False)
            case "expired":
                return queryset.filter(used_at__isnull=True, expires_at__lte=now)
        return queryset


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(ReadOnlyAdmin):
    list_display = ("hint", "owner", "created_at", "expires_at", "used_at", "node")
    list_filter = (TokenStateFilter,)
    list_select_related = ("owner", "node")
    search_fields = ("hint", "owner__username", "node__name")
    actions = None  # no bulk delete: one token at a time, and only an unused one

    def has_delete_permission(self, request, obj=None) -> bool:
        # Deleting an unused token withdraws it; a used one stays as the node's record.
        return obj is None or obj.used_at is None


@admin.register(UsedNonce)
class UsedNonceAdmin(ReadOnlyAdmin):
    list_display = ("kind", "nonce", "seen_at")
    list_filter = ("kind",)
    search_fields = ("nonce",)


@admin.register(NodeOutage)
class NodeOutageAdmin(ReadOnlyAdmin):
    list_display = ("node", "started_at", "ended_at", "duration")
    list_select_related = ("node",)
    search_fields = ("node__name",)
    date_hierarchy = "started_at"

    @admin.display(description="duration")
    def duration(self, outage: NodeOutage) -> str:
        return str(outage.ended_at - outage.started_at).split(".")[0]


@admin.register(Sandbox)
class SandboxAdmin(ReadOnlyAdmin):
    """Each job's container as the gateway asked for it and the agent last reported it."""

    list_display = (
        "ref",
        "node",
        "state",
        "address",
        "image",
        "added_revision",
        "removed_revision",
        "ready_at",
        "reported_at",
    )
    list_filter = ("state",)
    list_select_related = ("node",)
    search_fields = ("ref", "address", "image", "node__name")
    date_hierarchy = "created_at"


@admin.register(SandboxGpu)
class SandboxGpuAdmin(ReadOnlyAdmin):
    """Which sandbox holds which GPU of a node now (a row is deleted when its GPU is freed)."""

    list_display = ("node", "index", "sandbox")
    list_select_related = ("node", "sandbox")
    search_fields = ("node__name", "sandbox__ref")


# The relays' pages live in their own module (registered on import).
from meshnet import relay_admin  # noqa: E402, F401
