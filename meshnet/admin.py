from django.contrib import admin

from meshnet.models import EnrollmentToken, Gpu, IpAllocation, IpPool, JobPeer, Node


class GpuInline(admin.TabularInline):
    model = Gpu
    extra = 0


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "mesh_address",
        "hostname",
        "region",
        "last_seen_at",
        "desired_revision",
        "acked_revision",
        "revoked_at",
    )
    list_filter = ("region",)
    search_fields = ("name", "hostname", "node_id", "mesh_address")
    inlines = [GpuInline]


@admin.register(JobPeer)
class JobPeerAdmin(admin.ModelAdmin):
    list_display = ("ref", "node", "address", "state", "acked_at", "removed_at")
    list_filter = ("state",)
    search_fields = ("ref", "public_key", "address")


admin.site.register(IpPool, list_display=("name", "cidr", "next_offset"))
admin.site.register(
    IpAllocation,
    list_display=("address", "pool", "purpose", "allocated_at", "released_at", "reusable_after"),
    list_filter=("pool", "purpose"),
)
admin.site.register(
    EnrollmentToken, list_display=("hint", "owner", "created_at", "expires_at", "used_at", "node")
)
