"""Shapes of the mesh API: nodes, enrolment tokens and the agent's signed enrolment."""

from __future__ import annotations

from rest_framework import serializers

from meshnet.models import Gpu, Node


class ErrorSerializer(serializers.Serializer):
    """The body of every error raised by a service: a message, a stable code, and (when the
    error is about one input) `{field: [message]}` beside them."""

    detail = serializers.CharField()
    code = serializers.CharField()


class GpuSerializer(serializers.ModelSerializer):
    vram_gb = serializers.IntegerField(read_only=True, help_text="memory_mb rounded to GiB")

    class Meta:
        model = Gpu
        fields = [
            "index",
            "name",
            "memory_mb",
            "vram_gb",
            "driver_version",
            "cuda_version",
            "simulated",
            "temperature_c",
            "utilization_pct",
        ]
        read_only_fields = fields


class ConnectivitySerializer(serializers.Serializer):
    """The agent's latest check of its paths over the mesh (a signed CONNECTIVITY report)."""

    checked_at = serializers.DateTimeField(source="connectivity_checked_at", allow_null=True)
    hub = serializers.CharField(
        source="hub_path",
        help_text="reachable (a WireGuard handshake with the gateway's hub completed), "
        "unreachable, untested (no hub), or empty (never reported)",
    )
    hub_rtt_ms = serializers.IntegerField(
        allow_null=True, help_text="how long the handshake with the hub took"
    )
    peer = serializers.CharField(
        source="peer_path",
        help_text="the same for a peer node: untested until node-to-node peers exist",
    )
    peer_node_id = serializers.CharField(source="peer_path_node")
    peer_rtt_ms = serializers.IntegerField(allow_null=True)
    detail = serializers.CharField(source="connectivity_detail")


class NodeSerializer(serializers.ModelSerializer):
    online = serializers.BooleanField(
        read_only=True, help_text="a heartbeat arrived within MOLT_NODE_OFFLINE_AFTER_SECONDS"
    )
    gpus = GpuSerializer(many=True, read_only=True)
    last_seen = serializers.DateTimeField(source="last_seen_at", read_only=True, allow_null=True)
    endpoint = serializers.CharField(
        read_only=True, help_text="host:port buyers send WireGuard packets to; empty if unknown"
    )
    connectivity = ConnectivitySerializer(source="*", read_only=True)

    class Meta:
        model = Node
        fields = [
            "id",
            "node_id",
            "name",
            "mesh_address",
            "online",
            "gpus",
            "last_seen",
            "region",
            "endpoint",
            "enrolled_at",
            "connectivity",
        ]
        read_only_fields = fields


class EnrollmentTokenSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="shown once; only its hash is stored")
    expires_at = serializers.DateTimeField()
    install_command = serializers.CharField(help_text="run as root on the provider machine")


class EnrollEnvelopeSerializer(serializers.Serializer):
    """What `clawnode join` sends: an enrolment request signed by the node's identity key."""

    kind = serializers.CharField(help_text="molt/enroll/v1", trim_whitespace=False)
    body = serializers.JSONField(
        help_text=(
            "the enrolment request: token, identity_public_key, wireguard_public_key, hostname, "
            "listen_port, endpoint, gpus, timestamp, nonce, optional region "
            "(see clawnode.wire.EnrollRequest)"
        )
    )
    # The signature is checked byte for byte: never trim or rewrite it.
    signature = serializers.CharField(trim_whitespace=False, help_text="base64 Ed25519 signature")

    def validate_body(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be a JSON object")
        return value


class EnrollmentSerializer(serializers.Serializer):
    node_id = serializers.CharField()
    name = serializers.CharField(help_text="node-N")
    mesh_address = serializers.IPAddressField(protocol="IPv4")
    gateway_public_key = serializers.CharField(
        help_text="base64 Ed25519 key the gateway signs desired state with; pin it"
    )
    gateway_key_sequence = serializers.IntegerField(
        required=False,
        min_value=0,
        help_text="the place of gateway_public_key in the gateway's chain of key certificates "
        "(0: the key from before any rotation, n: the key certificate n made current); pin it "
        "with the key. Absent from gateways that predate it",
    )
    websocket_url = serializers.CharField()
    wireguard_listen_port = serializers.IntegerField(
        help_text="the WireGuard listen port the gateway recorded for this node"
    )
    hub_address = serializers.IPAddressField(
        protocol="IPv4", help_text="the gateway hub's mesh address (IP plan)"
    )
    mesh_network = serializers.CharField(
        help_text="the whole mesh (10.100.0.0/16): the node's interface prefix, on-link for the "
        "hub and every node block"
    )
    region = serializers.CharField(
        help_text="the region the node declared at its first join (its address is in that "
        "region's block); empty: none, the address is in the molt block"
    )
    job_network = serializers.CharField(
        help_text="the block buyers' job tunnel addresses come from: route it to the interface"
    )
