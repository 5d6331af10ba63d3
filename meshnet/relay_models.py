"""The relay's tables: the relays the gateway knows and the pairs it has given each
(meshnet.relays decides, meshnet.relay runs the process). Kept apart from models.py, which
imports them so Django registers them in the meshnet app."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class Relay(models.Model):
    """A relay process (meshnet.relay, docs/operations.md) an operator runs and lists here: it
    forwards WireGuard ciphertext between a buyer and a node whose NATs cannot be punched.

    The relay asks the gateway for its pairs with its token (meshnet.relays); only the token's
    hash and its first characters are stored. `region` empty: it serves nodes of every region
    (after the relays of a node's own region)."""

    name = models.CharField(max_length=32, unique=True)
    region = models.CharField(max_length=16, blank=True)
    address = models.GenericIPAddressField(
        protocol="IPv4", help_text="the public address buyers and nodes send to"
    )
    port_low = models.PositiveIntegerField(default=40000)
    port_high = models.PositiveIntegerField(default=40999)
    enabled = models.BooleanField(default=True)
    token_prefix = models.CharField(max_length=20, blank=True)
    token_hash = models.CharField(max_length=64, blank=True, db_index=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    # What the relay reported on its last request: per pair, bytes forwarded by Python and by
    # the kernel, whether it handshook (its load, for the ops pages).
    last_status = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(
                    port_low__gte=1, port_high__lte=65535, port_low__lt=models.F("port_high")
                ),
                name="relay_port_range_valid",
            )
        ]

    def __str__(self) -> str:
        return f"relay {self.name} ({self.region or 'any region'})"


class RelayAllocation(models.Model):
    """A relayed job peer: the relay's port the buyer sends to and the port the node sends to.
    Deleted when the peer leaves the node's desired state (the relay then closes the pair)."""

    relay = models.ForeignKey(Relay, on_delete=models.PROTECT, related_name="allocations")
    job_peer = models.OneToOneField(
        "meshnet.JobPeer", on_delete=models.CASCADE, related_name="relay_allocation"
    )
    buyer_port = models.PositiveIntegerField()
    provider_port = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    # When the relay first reported the pair (it reports only pairs whose ports it has bound).
    # Until then the node's desired state names no endpoint for the peer
    # (meshnet.desired_state): the node's first handshake initiation, sent the moment it gets an
    # endpoint, reached the relay before the relay had bound the pair's ports and was lost, and
    # wireguard-go retries only 5 s later (order to first handshake 6 s instead of 1 s). Named
    # once bound, the node's first initiation tells the relay where the node is.
    bound_at = models.DateTimeField(null=True, blank=True)
    # The upgrade to a direct path (meshnet.relays.start_upgrades): since when the node's
    # desired state names the buyer's own mapping instead of this relay; the bytes the relay
    # last reported for the pair and since when that count has not moved; what the node had
    # metered from the buyer (rx) then. The pair stays open meanwhile, so a buyer whose NAT drops
    # the node's direct packets keeps its tunnel through the relay (its next packet roams the
    # node back); NULL while no upgrade is under way.
    upgrade_started_at = models.DateTimeField(null=True, blank=True)
    upgrade_relay_bytes = models.BigIntegerField(default=0)
    upgrade_relay_quiet_since = models.DateTimeField(null=True, blank=True)
    upgrade_peer_rx = models.BigIntegerField(default=0)
    # When an upgrade was read as failed (the relay still carried the tunnel): the pair is not
    # tried again, so a buyer's NAT that drops the node's direct packets costs one try, not a
    # revision back and forth every few minutes.
    upgrade_failed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["relay", "buyer_port"], name="relay_buyer_port_once"),
            models.UniqueConstraint(
                fields=["relay", "provider_port"], name="relay_provider_port_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.job_peer_id} via {self.relay_id}:{self.buyer_port}/{self.provider_port}"

    @property
    def buyer_endpoint(self) -> str:
        return f"{self.relay.address}:{self.buyer_port}"

    @property
    def provider_endpoint(self) -> str:
        return f"{self.relay.address}:{self.provider_port}"
