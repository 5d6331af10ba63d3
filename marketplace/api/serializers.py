"""Shapes of the market API. Serializers check shape and type; business rules (ownership of a
listing, funds, free GPUs) live in the write paths (marketplace.orders, marketplace.listings).
Amounts are integers of micro-USD."""

from __future__ import annotations

from django.db.models import F
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.connect import connect_info, sandbox_of
from marketplace.models import Listing, Order, SshKey
from marketplace.money import MAX_PRICE, format_usd
from marketplace.settlement import cost_rate_per_hour, cost_so_far
from meshnet import relays
from meshnet.errors import InvalidPeerKey
from meshnet.keys import check_wireguard_public_key
from meshnet.models import Node


class ApiTokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField(trim_whitespace=False, style={"input_type": "password"})
    otp_token = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=8,
        help_text="Staff accounts only: the code their authenticator app shows now.",
    )


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
    reliability = serializers.SerializerMethodField(
        help_text="the node's reliability, 0 to 100: round(100 x jobs completed / finished x "
        "heartbeat uptime over 30 days); null until first computed (within a minute)"
    )
    images = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="sandbox images a buyer may pick; the first is the default",
    )
    online = serializers.SerializerMethodField(
        help_text="the node sent a heartbeat within MOLT_NODE_OFFLINE_AFTER_SECONDS (45 s)"
    )
    last_seen_at = serializers.DateTimeField(
        source="node.last_seen_at",
        read_only=True,
        allow_null=True,
        help_text="the node's last heartbeat; null: never seen",
    )
    driver_version = serializers.SerializerMethodField(
        help_text="NVIDIA driver of the listing's GPUs as the agent reports it (the lowest, "
        "if they differ); empty when unreported"
    )
    cuda_version = serializers.SerializerMethodField(
        help_text="CUDA version of the listing's GPUs (the lowest, if they differ)"
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
            "reliability",
            "images",
            "cpus_per_gpu",
            "memory_gb_per_gpu",
            "disk_gb",
            "egress",
            "online",
            "last_seen_at",
            "driver_version",
            "cuda_version",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "cpus_per_gpu": {"help_text": "CPU cores a job gets per GPU ordered"},
            "memory_gb_per_gpu": {"help_text": "GB of memory a job gets per GPU ordered"},
            "disk_gb": {"help_text": "GB of disk per job (the container's writable layer)"},
            "egress": {"help_text": "whether jobs may reach the internet (NAT behind the node)"},
        }

    def get_reliability(self, listing: Listing) -> int | None:
        record = getattr(listing.node, "reliability", None)  # None: no NodeReliability row yet
        return record.score if record is not None else None

    def get_online(self, listing: Listing) -> bool:
        return listing.node.online

    def _lowest(self, listing: Listing, field: str) -> str:
        annotated = getattr(listing, field, None)  # marketplace.market.offers annotates it
        if annotated is not None:
            return annotated
        gpus = listing.node.gpus.filter(name=listing.gpu_model).order_by(
            F(f"{field}_key").asc(nulls_first=True)
        )
        return gpus.values_list(field, flat=True).first() or ""

    def get_driver_version(self, listing: Listing) -> str:
        return self._lowest(listing, "driver_version")

    def get_cuda_version(self, listing: Listing) -> str:
        return self._lowest(listing, "cuda_version")

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


# A refusal says dollars, as every text a person reads does (the field itself stays an integer).
PRICE_ERRORS = {"max_value": f"a price is at most {format_usd(MAX_PRICE)} ({MAX_PRICE})"}


class ListingCreateSerializer(serializers.Serializer):
    node = OwnNodeField(help_text="id of one of your nodes")
    gpu_count = serializers.IntegerField(min_value=1)
    price_per_gpu_hour = serializers.IntegerField(
        min_value=0,
        max_value=MAX_PRICE,
        help_text="micro-USD per GPU-hour",
        error_messages=PRICE_ERRORS,
    )
    price_per_gib = serializers.IntegerField(
        min_value=0, max_value=MAX_PRICE, help_text="micro-USD per GiB", error_messages=PRICE_ERRORS
    )
    gpu_model = serializers.CharField(
        required=False, help_text="which model, when the node has several"
    )
    region = serializers.CharField(
        required=False,
        help_text="always the node's region (declared at `clawnode join --region`); if given, "
        "it must be that one (400 otherwise)",
    )
    images = serializers.ListField(
        child=serializers.CharField(max_length=255),
        required=False,
        max_length=32,
        help_text="each one the node reports it runs (its `images`); default all of them",
    )
    cpus_per_gpu = serializers.IntegerField(required=False, min_value=1, max_value=256)
    memory_gb_per_gpu = serializers.IntegerField(required=False, min_value=1, max_value=4096)
    disk_gb = serializers.IntegerField(required=False, min_value=1, max_value=100_000)
    egress = serializers.BooleanField(
        required=False, help_text="jobs may reach the internet (default true)"
    )


class ListingUpdateSerializer(serializers.Serializer):
    price_per_gpu_hour = serializers.IntegerField(min_value=0, max_value=MAX_PRICE, required=False)
    price_per_gib = serializers.IntegerField(min_value=0, max_value=MAX_PRICE, required=False)
    gpu_count = serializers.IntegerField(min_value=1, required=False)
    is_active = serializers.BooleanField(required=False, help_text="false pauses the listing")
    images = serializers.ListField(
        child=serializers.CharField(max_length=255),
        required=False,
        max_length=32,
        help_text="each one the node reports it runs; the first is the default",
    )
    cpus_per_gpu = serializers.IntegerField(required=False, min_value=1, max_value=256)
    memory_gb_per_gpu = serializers.IntegerField(required=False, min_value=1, max_value=4096)
    disk_gb = serializers.IntegerField(required=False, min_value=1, max_value=100_000)
    egress = serializers.BooleanField(required=False)


def validate_wireguard_public_key(value: str) -> str:
    try:
        return check_wireguard_public_key(value)
    except InvalidPeerKey as exc:
        raise serializers.ValidationError(str(exc)) from None


class OrderCreateSerializer(serializers.Serializer):
    listing = serializers.IntegerField(min_value=1, help_text="listing id")
    image = serializers.CharField(
        required=False,
        max_length=255,
        help_text="one of the listing's `images` for the sandbox; default its first",
    )
    gpu_count = serializers.IntegerField(min_value=1)
    hours = serializers.IntegerField(min_value=1)
    wireguard_public_key = serializers.CharField(
        trim_whitespace=False,
        validators=[validate_wireguard_public_key],
        help_text="base64 X25519 public key of a key pair made for this order (`wg genkey`)",
    )


class DisputeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    order = serializers.IntegerField(source="order_id")
    state = serializers.CharField(help_text="open, then resolved by an operator")
    reason = serializers.CharField()
    opened_at = serializers.DateTimeField()
    resolved_at = serializers.DateTimeField(allow_null=True)
    refund = serializers.IntegerField(allow_null=True, help_text="micro-USD back to your wallet")
    resolution_note = serializers.CharField()


class SandboxGpuSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    model = serializers.CharField()
    uuid = serializers.CharField()


class SandboxSerializer(serializers.Serializer):
    """How to reach the order's sandbox, as its node last reported it."""

    state = serializers.ChoiceField(
        choices=["pending", "pulling", "starting", "ready", "stopped", "failed"],
        help_text="ready: sshd accepts; the order runs (and is billed) from then",
    )
    detail = serializers.CharField(help_text="why it failed, or what it is doing")
    progress = serializers.IntegerField(help_text="0 to 100 while pulling the image")
    address = serializers.IPAddressField(help_text="the sandbox's address, through your tunnel")
    image = serializers.CharField()
    gpus = SandboxGpuSerializer(many=True, help_text="the GPUs the container really got")
    ssh_command = serializers.CharField(help_text="e.g. `ssh root@10.128.0.2`")
    host_key_fingerprints = serializers.ListField(
        child=serializers.CharField(), help_text="`SHA256:...` of each sshd host key"
    )
    known_hosts = serializers.CharField(
        help_text="lines for ~/.ssh/known_hosts, one per host key: `<address> <type> <base64>`"
        " (host keys are made fresh for each job)"
    )
    ports = serializers.ListField(
        child=serializers.IntegerField(), help_text="TCP ports the image exposes besides ssh"
    )


class RoundTripSerializer(serializers.Serializer):
    answered = serializers.BooleanField(
        help_text="whether the buyer's tunnel address answered the node's ping"
    )
    ms = serializers.FloatField(
        allow_null=True,
        help_text="the round trip in milliseconds (to the microsecond); null with no answer",
    )
    measured_at = serializers.DateTimeField(help_text="when the node pinged")


class PathSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["direct", "relayed"])
    relay = serializers.CharField(allow_null=True, help_text="the relay's name when relayed")
    region = serializers.CharField(allow_null=True, help_text="the relay's region, if it has one")
    round_trip = RoundTripSerializer(
        allow_null=True,
        help_text="the node's latest ping of the buyer's tunnel address from its mesh address, "
        "about once a minute while the tunnel has a live session; null before any",
    )


class OrderSerializer(serializers.ModelSerializer):
    hold = serializers.IntegerField(source="hold_amount", read_only=True, help_text="micro-USD")
    charges = serializers.SerializerMethodField(
        help_text="micro-USD captured at settlement; null until the order is settled"
    )
    cost_so_far = serializers.SerializerMethodField(
        help_text="micro-USD the order has cost up to now (time without the node's outages, "
        "plus traffic, at most the hold); once settled, what was captured"
    )
    cost_rate_per_hour = serializers.SerializerMethodField(
        help_text="micro-USD another hour of GPU time costs while the order runs (traffic on "
        "top, at price_per_gib); 0 when it is not running"
    )
    dispute = serializers.SerializerMethodField(
        help_text="the buyer's dispute of this order, null if none"
    )
    dispute_window_ends_at = serializers.SerializerMethodField(
        help_text="until when the order can be disputed; null when it was not charged"
    )
    job_address = serializers.SerializerMethodField(help_text="the buyer's tunnel address")
    provider_address = serializers.SerializerMethodField(help_text="the node's mesh address")
    provider_public_key = serializers.SerializerMethodField(help_text="the node's WireGuard key")
    endpoint = serializers.SerializerMethodField(
        help_text="host:port the buyer's client sends to: the provider node, or its relay port"
    )
    path = serializers.SerializerMethodField(
        help_text="how the tunnel runs: kind `direct` or `relayed` (via `relay`, in `region`), "
        "and its latest `round_trip`; null until provisioned"
    )
    sandbox = serializers.SerializerMethodField(
        help_text="the job's container: null until provisioning made it"
    )

    class Meta:
        model = Order
        fields = [
            "id",
            "listing",
            "image",
            "gpu_count",
            "hours",
            "state",
            "wireguard_public_key",
            "price_per_gpu_hour",
            "price_per_gib",
            "bandwidth_allowance_bytes",
            "hold",
            "charges",
            "cost_so_far",
            "cost_rate_per_hour",
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
            "path",
            "dispute",
            "dispute_window_ends_at",
            "sandbox",
            # A part of a multi-node order (/api/v1/clusters/): its cluster and index; null
            # for a single-node order.
            "cluster",
            "part_index",
        ]
        read_only_fields = fields

    @extend_schema_field(SandboxSerializer(allow_null=True))
    def get_sandbox(self, order: Order) -> dict | None:
        # A list passes its page's sandboxes in the context (one query for the page).
        known = self.context.get("sandboxes")
        sandbox = known.get(order.pk) if known is not None else sandbox_of(order.pk)
        return connect_info(sandbox)

    def get_cost_so_far(self, order: Order) -> int:
        return cost_so_far(order)

    def get_cost_rate_per_hour(self, order: Order) -> int:
        return cost_rate_per_hour(order)

    def get_charges(self, order: Order) -> int | None:
        settlement = getattr(order, "settlement", None)
        return settlement.captured if settlement is not None else None

    @extend_schema_field(DisputeSerializer(allow_null=True))
    def get_dispute(self, order: Order) -> dict | None:
        dispute = getattr(order, "dispute", None)
        return DisputeSerializer(dispute).data if dispute is not None else None

    # Null for an order that was never charged: documented as nullable (Schemathesis found a
    # buyer's order list answering null where the schema promised a date-time).
    @extend_schema_field({"type": "string", "format": "date-time", "nullable": True})
    def get_dispute_window_ends_at(self, order: Order):
        share = getattr(order, "earnings_hold", None)
        if share is None:
            return None
        return serializers.DateTimeField().to_representation(share.release_after)

    # Tunnel details exist once provisioning allocated the job's peer.
    def get_job_address(self, order: Order) -> str | None:
        return order.job_peer.address if order.job_peer_id else None

    def get_provider_address(self, order: Order) -> str | None:
        return order.listing.node.mesh_address if order.job_peer_id else None

    def get_provider_public_key(self, order: Order) -> str | None:
        return order.listing.node.wireguard_public_key if order.job_peer_id else None

    def get_endpoint(self, order: Order) -> str | None:
        return (relays.buyer_endpoint(order.job_peer) or None) if order.job_peer_id else None

    @extend_schema_field(PathSerializer(allow_null=True))
    def get_path(self, order: Order) -> dict | None:
        path = relays.path_of(order.job_peer) if order.job_peer_id else None
        return PathSerializer(path).data if path is not None else None


class WalletSerializer(serializers.Serializer):
    available = serializers.IntegerField(help_text="spendable, in `unit` of `currency`")
    held = serializers.IntegerField(help_text="in escrow for live orders")
    earnings = serializers.IntegerField(
        help_text="as a provider: earnings you can request to be paid out"
    )
    earnings_frozen = serializers.IntegerField(
        help_text="as a provider: shares of settled orders still in their dispute window"
    )
    payouts_pending = serializers.IntegerField(
        help_text="as a provider: requested payouts an operator has not decided yet"
    )
    currency = serializers.CharField()
    unit = serializers.CharField(help_text="micro: amounts are integers of 1e-6 `currency`")


class QuoteRequestSerializer(serializers.Serializer):
    hours = serializers.IntegerField(min_value=1, help_text="hours booked")
    gpu_count = serializers.IntegerField(min_value=1, help_text="GPUs of the listing")


class QuoteDisplaySerializer(serializers.Serializer):
    """The quote's amounts as people read them (marketplace.money's rule: dollars and cents),
    so a page shows the server's spelling instead of formatting money itself."""

    time_charge = serializers.CharField()
    bandwidth_allowance_charge = serializers.CharField()
    fee = serializers.CharField()
    total_hold = serializers.CharField()


class QuoteSerializer(serializers.Serializer):
    """The all-in price of an order not yet placed; `total_hold` is what the escrow would hold.
    Amounts in micro-USD."""

    listing = serializers.IntegerField()
    hours = serializers.IntegerField()
    gpu_count = serializers.IntegerField()
    gpus_available = serializers.IntegerField(help_text="GPUs of the listing free right now")
    time_charge = serializers.IntegerField(help_text="price per GPU-hour x GPUs x hours")
    bandwidth_allowance_bytes = serializers.IntegerField()
    bandwidth_allowance_charge = serializers.IntegerField(
        help_text="the allowance at the listing's price per GiB; unused traffic is released"
    )
    fee = serializers.IntegerField(
        help_text="platform fee, taken from what is captured (included, not added on top)"
    )
    total_hold = serializers.IntegerField(help_text="held on your wallet when you order")
    currency = serializers.CharField()
    unit = serializers.CharField()
    display = QuoteDisplaySerializer(help_text="the amounts above as text, e.g. `$2.49`")


class RekeySerializer(serializers.Serializer):
    wireguard_public_key = serializers.CharField(
        trim_whitespace=False,
        validators=[validate_wireguard_public_key],
        help_text="base64 X25519 public key of a new key pair for this order (every part of a "
        "multi-node order)",
    )


# --- SSH keys --------------------------------------------------------------------------------


class SshKeySerializer(serializers.ModelSerializer):
    public_key = serializers.CharField(
        read_only=True, help_text="as authorized_keys takes it: type, base64 key, comment"
    )
    fingerprint = serializers.CharField(
        read_only=True, help_text="`SHA256:...`, as `ssh-keygen -l` prints it"
    )

    class Meta:
        model = SshKey
        fields = ["id", "name", "public_key", "fingerprint", "created_at"]
        read_only_fields = fields


class SshKeyCreateSerializer(serializers.Serializer):
    # Lengths and content are checked by marketplace.ssh_keys, which names the field.
    name = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        help_text="what the key is for; defaults to the key's comment",
    )
    public_key = serializers.CharField(
        trim_whitespace=False,
        help_text="the one line of your .pub file, e.g. `ssh-ed25519 AAAA... you@laptop`; "
        "no options, no private key, one key",
    )


# --- money: top-ups, disputes, payouts, receipts ---------------------------------------------


class TopUpRequestSerializer(serializers.Serializer):
    amount = serializers.IntegerField(min_value=1, max_value=10**12, help_text="micro-USD")
    user = serializers.CharField(
        required=False, help_text="username to credit (operators only); default yourself"
    )


class TopUpSerializer(serializers.Serializer):
    transaction = serializers.IntegerField(help_text="id of the ledger transaction")
    user = serializers.CharField()
    amount = serializers.IntegerField()
    available = serializers.IntegerField(help_text="the wallet's available balance after it")


class DisputeRequestSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, help_text="what went wrong")


class PayoutCreateSerializer(serializers.Serializer):
    amount = serializers.IntegerField(min_value=1, max_value=10**12, help_text="micro-USD")


class PayoutSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    amount = serializers.IntegerField()
    state = serializers.CharField(help_text="requested, then paid or rejected by an operator")
    requested_at = serializers.DateTimeField()
    decided_at = serializers.DateTimeField(allow_null=True)
    note = serializers.CharField(help_text="the payment reference, or why it was rejected")


class ReceiptLineSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["time", "offline_credit", "bandwidth", "hold_cap"])
    description = serializers.CharField()
    amount = serializers.IntegerField(help_text="micro-USD; the lines sum to `captured`")
    seconds = serializers.IntegerField(allow_null=True)
    gpu_count = serializers.IntegerField(allow_null=True)
    bytes = serializers.IntegerField(allow_null=True)


class ReceiptSerializer(serializers.Serializer):
    order = serializers.IntegerField()
    state = serializers.CharField()
    hold = serializers.IntegerField(help_text="what was held when the order was placed")
    lines = ReceiptLineSerializer(many=True)
    captured = serializers.IntegerField(help_text="what you paid: the sum of the lines")
    platform_fee = serializers.IntegerField(help_text="the platform's share of `captured`")
    provider_share = serializers.IntegerField(help_text="the provider's share of `captured`")
    released = serializers.IntegerField(help_text="back to your wallet at settlement")
    refunded = serializers.IntegerField(help_text="back to your wallet after a dispute")
    net_paid = serializers.IntegerField(help_text="captured less refunded")
    settled_at = serializers.DateTimeField(allow_null=True)
    currency = serializers.CharField()
    unit = serializers.CharField()
