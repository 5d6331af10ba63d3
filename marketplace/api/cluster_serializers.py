"""Shapes of the multi-node order API (/api/v1/clusters/). Amounts are integers of micro-USD.
Business rules (duplicate listings, free GPUs, funds) live in marketplace.clusters."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace import cluster_state
from marketplace.api.serializers import OrderSerializer, validate_wireguard_public_key
from marketplace.cluster_models import Cluster
from marketplace.clusters import MAX_PARTS, state_of


class ClusterPartCreateSerializer(serializers.Serializer):
    listing = serializers.IntegerField(min_value=1, help_text="listing id; each at most once")
    gpu_count = serializers.IntegerField(min_value=1)
    image = serializers.CharField(
        required=False,
        max_length=255,
        help_text="one of the listing's `images` for this part's sandbox; default its first",
    )


class ClusterCreateSerializer(serializers.Serializer):
    wireguard_public_key = serializers.CharField(
        trim_whitespace=False,
        validators=[validate_wireguard_public_key],
        help_text="base64 X25519 public key of a key pair made for this order (`wg genkey`): "
        "every part's node gets it, and the order's one wireguard.conf reaches every sandbox",
    )
    parts = ClusterPartCreateSerializer(
        many=True,
        min_length=1,
        max_length=MAX_PARTS,
        help_text=f"the listings to take GPUs of, any regions and providers; 1 to {MAX_PARTS}",
    )
    hours = serializers.IntegerField(min_value=1, help_text="booked time of every part")
    on_part_loss = serializers.ChoiceField(
        choices=Cluster.OnPartLoss.choices,
        help_text="a part failing (its node lost past the grace, its sandbox dead): `end` "
        "stops the whole job, `degrade` keeps the other parts running and billing",
    )


class ClusterPartSerializer(OrderSerializer):
    """One part: the order on its listing, as /api/v1/orders/{id}/ shows it, and its region."""

    region = serializers.CharField(source="listing.region", read_only=True)

    class Meta(OrderSerializer.Meta):
        fields = [*OrderSerializer.Meta.fields, "region"]
        read_only_fields = fields


class ClusterSerializer(serializers.ModelSerializer):
    state = serializers.SerializerMethodField(
        help_text="derived from the parts: running when every part runs; degraded when a part "
        "ended and the rest run; see docs/api.md"
    )
    hold = serializers.IntegerField(
        source="hold_amount", read_only=True, help_text="micro-USD: the one hold for all parts"
    )
    held = serializers.SerializerMethodField(
        help_text="micro-USD still in escrow: the hold less what ended parts captured, 0 once "
        "every part ended and the rest was released"
    )
    cost_so_far = serializers.SerializerMethodField(
        help_text="micro-USD: the sum of the parts' cost_so_far"
    )
    parts = serializers.SerializerMethodField()

    class Meta:
        model = Cluster
        fields = [
            "id",
            "state",
            "on_part_loss",
            "hours",
            "wireguard_public_key",
            "hold",
            "held",
            "cost_so_far",
            "created_at",
            "ended_by_loss_at",
            "reason",
            "parts",
        ]
        read_only_fields = fields

    def _parts(self, cluster: Cluster) -> list:
        # ClusterViewSet prefetches the parts (with what the part serializer reads), ordered.
        return list(cluster.parts.all())

    @extend_schema_field(serializers.ChoiceField(choices=cluster_state.CHOICES))
    def get_state(self, cluster: Cluster) -> str:
        return state_of(cluster, self._parts(cluster))

    def get_held(self, cluster: Cluster) -> int:
        hold = cluster.hold
        return hold.account.balance if hold.state == "open" else 0

    def get_cost_so_far(self, cluster: Cluster) -> int:
        field = OrderSerializer()
        return sum(field.get_cost_so_far(part) for part in self._parts(cluster))

    @extend_schema_field(ClusterPartSerializer(many=True))
    def get_parts(self, cluster: Cluster) -> list:
        return ClusterPartSerializer(self._parts(cluster), many=True, context=self.context).data
