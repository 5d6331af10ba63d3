"""Shapes of the market API. Serializers check shape and type; business rules (ownership of a
listing, funds, free GPUs) live in marketplace.services. Amounts are integers of micro-USD."""

from __future__ import annotations

from clawnode.keys import InvalidKey, parse_wireguard_public_key
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.models import Listing, Order
from meshnet.models import Node


class ApiTokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField(trim_whitespace=False, style={"input_type": "password"})


class ApiTokenSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="`Authorization: Bearer <token>`; shown once")


class NodeRefSerializer(serializers.ModelSerializer):
    class Meta:
        model = Node
        fields = ["id", "name"]
        read_only_fields = fields


class ListingSerializer(serializers.ModelSerializer):
    node = NodeRefSerializer(read_only=True)
    owner = serializers.CharField(source="owner.username", read_only=True)
    gpus_available = serializers.SerializerMethodField(
        help_text="GPUs of this listing not taken by live orders"
    )

    class Meta:
        model = Listing
        fields = [
            "id",
            "node",
            "owner",
            "gpu_model",
            "vram_gb",
            "gpu_count",
            "gpus_available",
            "price_per_gpu_hour",
            "price_per_gib",
            "region",
            "simulated",
            "is_active",
            "created_at",
        ]
        read_only_fields = fields

    def get_gpus_available(self, listing: Listing) -> int:
        in_use = getattr(listing, "gpus_in_use", None)
        if in_use is None:  # not annotated (a listing fresh from a service)
            in_use = Order.objects.gpus_in_use(listing.pk)
        return max(listing.gpu_count - in_use, 0)


@extend_schema_field(OpenApiTypes.INT)
class OwnNodeField(serializers.PrimaryKeyRelatedField):
    """A node id of the caller's own, active nodes; anything else reads as unknown."""

    default_error_messages = {
        "does_not_exist": "unknown node",
        "incorrect_type": "node must be a node id (integer)",
    }

    def get_queryset(self):
        request = self.context["request"]
        return Node.objects.owned_by(request.user).active()


class ListingCreateSerializer(serializers.Serializer):
    node = OwnNodeField(help_text="id of one of your nodes")
    gpu_count = serializers.IntegerField(min_value=1)
    price_per_gpu_hour = serializers.IntegerField(min_value=0, help_text="micro-USD per GPU-hour")
    price_per_gib = serializers.IntegerField(min_value=0, help_text="micro-USD per GiB")
    gpu_model = serializers.CharField(
        required=False, help_text="which model, when the node has several"
    )
    region = serializers.CharField(required=False, help_text="defaults to the node's region")


class ListingUpdateSerializer(serializers.Serializer):
    price_per_gpu_hour = serializers.IntegerField(min_value=0, required=False)
    price_per_gib = serializers.IntegerField(min_value=0, required=False)
    gpu_count = serializers.IntegerField(min_value=1, required=False)
    is_active = serializers.BooleanField(required=False, help_text="false pauses the listing")


def validate_wireguard_public_key(value: str) -> str:
    try:
        parse_wireguard_public_key(value)
    except InvalidKey as exc:
        raise serializers.ValidationError(str(exc)) from None
    return value


class OrderCreateSerializer(serializers.Serializer):
    listing = serializers.IntegerField(min_value=1, help_text="listing id")
    gpu_count = serializers.IntegerField(min_value=1)
    hours = serializers.IntegerField(min_value=1)
    wireguard_public_key = serializers.CharField(
        trim_whitespace=False,
        validators=[validate_wireguard_public_key],
        help_text="base64 X25519 public key of a key pair made for this order (`wg genkey`)",
    )


class OrderSerializer(serializers.ModelSerializer):
    hold = serializers.IntegerField(source="hold_amount", read_only=True, help_text="micro-USD")
    charges = serializers.SerializerMethodField(
        help_text="micro-USD captured at settlement; null until the order is settled"
    )
    job_address = serializers.SerializerMethodField(help_text="the buyer's tunnel address")
    provider_address = serializers.SerializerMethodField(help_text="the node's mesh address")
    provider_public_key = serializers.SerializerMethodField(help_text="the node's WireGuard key")
    endpoint = serializers.SerializerMethodField(help_text="host:port of the provider node")

    class Meta:
        model = Order
        fields = [
            "id",
            "listing",
            "gpu_count",
            "hours",
            "state",
            "wireguard_public_key",
            "price_per_gpu_hour",
            "price_per_gib",
            "bandwidth_allowance_bytes",
            "hold",
            "charges",
            "bytes_in",
            "bytes_out",
            "created_at",
            "running_since",
            "ends_at",
            "ended_at",
            "reason",
            "job_address",
            "provider_address",
            "provider_public_key",
            "endpoint",
        ]
        read_only_fields = fields

    def get_charges(self, order: Order) -> int | None:
        settlement = getattr(order, "settlement", None)
        return settlement.captured if settlement is not None else None

    # Tunnel details exist once provisioning allocated the job's peer.
    def get_job_address(self, order: Order) -> str | None:
        return order.job_peer.address if order.job_peer_id else None

    def get_provider_address(self, order: Order) -> str | None:
        return order.listing.node.mesh_address if order.job_peer_id else None

    def get_provider_public_key(self, order: Order) -> str | None:
        return order.listing.node.wireguard_public_key if order.job_peer_id else None

    def get_endpoint(self, order: Order) -> str | None:
        return (order.listing.node.endpoint or None) if order.job_peer_id else None


class WalletSerializer(serializers.Serializer):
    available = serializers.IntegerField(help_text="spendable, in `unit` of `currency`")
    held = serializers.IntegerField(help_text="in escrow for live orders")
    currency = serializers.CharField()
    unit = serializers.CharField(help_text="micro: amounts are integers of 1e-6 `currency`")
