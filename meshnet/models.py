"""Tables of the mesh: address pools and leases, nodes and their GPUs, enrolment tokens,
replay nonces, job peers and their keys, metering samples and node outages, relays and their
port pairs."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import F, Q, Sum, Value
from django.db.models.functions import Concat
from django.utils import timezone

from meshnet.querysets import JobPeerQuerySet, NodeQuerySet


class IpPool(models.Model):
    """One allocatable block of the IP plan (see meshnet.ipplan).

    `next_offset` is the first offset never handed out. Allocation takes fresh offsets in order
    until the pool's end, then reuses released addresses whose quarantine has passed, so it
    never scans the pool. The row doubles as the per-pool lock (SELECT ... FOR UPDATE).
    """

    name = models.CharField(max_length=32, unique=True)
    cidr = models.CharField(max_length=18)
    next_offset = models.PositiveIntegerField(default=1)

    def __str__(self) -> str:
        return f"{self.name} {self.cidr}"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)


class IpAllocation(models.Model):
    """A lease of one address of a pool. Released leases stay as rows (quarantine, history)."""

    class Purpose(models.TextChoices):
        NODE = "node", "provider node"
        JOB = "job", "job tunnel"
        SANDBOX = "sandbox", "job sandbox"

    pool = models.ForeignKey(IpPool, on_delete=models.PROTECT, related_name="allocations")
    address = models.GenericIPAddressField(protocol="IPv4")
    purpose = models.CharField(max_length=8, choices=Purpose.choices)
    allocated_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)
    reusable_after = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # The guarantee: one row per address per pool, whatever the locks did.
            models.UniqueConstraint(fields=["pool", "address"], name="ip_unique_per_pool"),
            models.CheckConstraint(
                condition=Q(released_at__isnull=True, reusable_after__isnull=True)
                | Q(released_at__isnull=False, reusable_after__isnull=False),
                name="ip_released_has_quarantine",
            ),
        ]
        indexes = [
            # Finding a reusable address is an index range scan, not a pool scan.
            models.Index(fields=["pool", "reusable_after"], name="ip_reusable_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.address} ({self.pool.name}, {self.purpose})"

    @property
    def in_use(self) -> bool:
        return self.released_at is None


class Node(models.Model):
    """A provider machine. Its identity is its Ed25519 key; its epoch-0 WireGuard key is the
    X25519 conversion of that key."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="nodes"
    )
    node_id = models.CharField(max_length=40, unique=True)
    name = models.CharField(max_length=32, unique=True)
    identity_public_key = models.CharField(max_length=44, unique=True)
    wireguard_public_key = models.CharField(max_length=44, unique=True)
    mesh_address = models.GenericIPAddressField(protocol="IPv4", unique=True)
    allocation = models.OneToOneField(
        IpAllocation, null=True, blank=True, on_delete=models.SET_NULL, related_name="node"
    )
    hostname = models.CharField(max_length=253, blank=True)
    region = models.CharField(max_length=16, blank=True)
    listen_port = models.PositiveIntegerField(default=51820)
    declared_endpoint = models.CharField(max_length=300, blank=True)
    observed_ip = models.GenericIPAddressField(null=True, blank=True)
    # The public mapping of the node's WireGuard socket as the gateway's hub sees it (meshnet.hub:
    # the endpoint of the node's latest authenticated packet to the hub), and since when the hub
    # has seen this one. Empty while no hub runs or the node never reached it.
    observed_endpoint = models.CharField(max_length=300, blank=True)
    observed_endpoint_at = models.DateTimeField(null=True, blank=True)
    enrolled_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # The sandbox images the agent is configured to run (its inventory report); a listing
    # offers some of these.
    images = models.JSONField(default=list, blank=True)
    # The agent runs the names responder (clawnode.names; its inventory says so): buyers'
    # configs then name it as their DNS for the order's names (meshnet.names.buyer_dns).
    names_responder = models.BooleanField(default=False)
    # Level-triggered desired state: the gateway bumps desired_revision on every change and
    # the agent acknowledges; a beat task re-pushes to any node whose ack lags.
    desired_revision = models.PositiveBigIntegerField(default=0)
    acked_revision = models.PositiveBigIntegerField(default=0)
    # The agent's last complaint (e.g. a desired state whose signature it refused).
    last_report = models.CharField(max_length=500, blank=True)
    last_report_at = models.DateTimeField(null=True, blank=True)
    # The agent's latest connectivity check (a signed CONNECTIVITY report, meshnet.connectivity):
    # a WireGuard handshake with the gateway's hub and how long it took, and the same for a peer
    # node ("untested" until node-to-node peers exist). Empty states: never reported.
    connectivity_checked_at = models.DateTimeField(null=True, blank=True)
    hub_path = models.CharField(max_length=12, blank=True)
    hub_rtt_ms = models.PositiveIntegerField(null=True, blank=True)
    peer_path = models.CharField(max_length=12, blank=True)
    peer_path_node = models.CharField(max_length=64, blank=True)
    peer_rtt_ms = models.PositiveIntegerField(null=True, blank=True)
    connectivity_detail = models.CharField(max_length=300, blank=True)

    objects = NodeQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        # The market hides listings of nodes not seen lately (marketplace.market.offers).
        indexes = [models.Index(fields=["last_seen_at"], name="node_last_seen_idx")]

    def __str__(self) -> str:
        return self.name

    @property
    def online(self) -> bool:
        if self.last_seen_at is None or self.revoked_at is not None:
            return False
        window = timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
        return timezone.now() - self.last_seen_at <= window

    @property
    def endpoint(self) -> str:
        """Where buyers send WireGuard packets: declared on join, else the mapping of its
        WireGuard socket the hub observed (behind a NAT the only one that reaches it), else the
        address the gateway saw the node connect from plus its listen port.

        A declared endpoint wins over the observed mapping: the provider said where to send
        (a forwarded port, a name that outlives an address change), and a node that declared
        one is reachable there by its own word (docs/nat.md)."""
        if self.declared_endpoint:
            return self.declared_endpoint
        if self.observed_endpoint:
            return self.observed_endpoint
        if self.observed_ip:
            host = self.observed_ip
            if ":" in host:
                host = f"[{host}]"
            return f"{host}:{self.listen_port}"
        return ""


class Gpu(models.Model):
    """A GPU of a node, as its agent last reported it through NVML (or simulated)."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField()
    # Lengths as clawnode.wire.GpuInfo allows them, so a valid report always fits.
    name = models.CharField(max_length=256)
    memory_mb = models.PositiveIntegerField()
    uuid = models.CharField(max_length=128, blank=True)
    driver_version = models.CharField(max_length=64, blank=True)
    cuda_version = models.CharField(max_length=64, blank=True)
    # meshnet.versions.version_key of the two above, written with them: what the market's
    # minimum-version filters compare (None: the report was not a version).
    driver_version_key = models.BigIntegerField(null=True, blank=True)
    cuda_version_key = models.BigIntegerField(null=True, blank=True)
    simulated = models.BooleanField(default=False)
    temperature_c = models.PositiveSmallIntegerField(null=True, blank=True)
    utilization_pct = models.PositiveSmallIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["node_id", "index"]
        constraints = [models.UniqueConstraint(fields=["node", "index"], name="gpu_unique_index")]

    def __str__(self) -> str:
        return f"{self.node.name} GPU{self.index} {self.name}"

    @property
    def vram_gb(self) -> int:
        return round(self.memory_mb / 1024)


class EnrollmentToken(models.Model):
    """A one-time, expiring enrolment token. Only its SHA-256 is stored; the prefix of the
    plaintext (`molt_enr_`) makes a leaked token findable by grep."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="enrollment_tokens"
    )
    token_hash = models.CharField(max_length=64, unique=True)
    hint = models.CharField(max_length=24, help_text="first characters, for display only")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    node = models.OneToOneField(
        Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="enrollment_token"
    )

    def __str__(self) -> str:
        return f"{self.hint}… ({self.owner})"


class UsedNonce(models.Model):
    """Nonces of signed one-shot messages already accepted; the unique constraint refuses a
    replay even when two copies race."""

    kind = models.CharField(max_length=40)
    nonce = models.CharField(max_length=64)
    seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "nonce"], name="nonce_once")]
        indexes = [models.Index(fields=["seen_at"], name="nonce_seen_idx")]

    def __str__(self) -> str:
        return f"{self.kind} {self.nonce}"


class PeerKeyClaim(models.Model):
    """Which job a buyer's WireGuard public key belongs to while any peer has it live.

    A key is live on one peer, or on several peers of one job group: the parts of a multi-node
    order share the buyer's one key (one tunnel reaching every node of the order). `group` is
    the group's name outside meshnet ("cluster:<id>"; a single job's group is its peer's ref).
    Every live JobPeer references its key's claim by `token` (its key and its group), and each
    row checks the token against its own columns, so the database holds the rule: one key, one
    group at a time (public_key is unique here). A claim no live peer references is taken over
    by the next group that asks for the key (meshnet.peers._claim_key, under the claim's row
    lock); rows are never deleted.

    A shared group's one tunnel address is the claim's `allocation`: its parts' peers take
    their address from it (they hold no lease of their own), and it is released when the last
    of them is removed (meshnet.peers.release_unclaimed)."""

    public_key = models.CharField(max_length=44, unique=True)
    group = models.CharField(max_length=64)
    token = models.CharField(max_length=109, unique=True)
    allocation = models.OneToOneField(
        IpAllocation, null=True, blank=True, on_delete=models.SET_NULL, related_name="key_claim"
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(token=Concat(F("public_key"), Value(" "), F("group"))),
                name="key_claim_token_is_key_and_group",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.public_key[:8]}… of {self.group}"

    @staticmethod
    def token_for(public_key: str, group: str) -> str:
        return f"{public_key} {group}"


class JobPeer(models.Model):
    """A buyer's WireGuard peer on a provider node, scoped to one job.

    desired -> active (agent acknowledged) -> removing -> removed (agent acknowledged removal).
    `ref` names the job outside meshnet (marketplace uses "order:<id>"), so meshnet does not
    import marketplace. `public_key` is the current key; every key the peer has had, with its
    metered bytes, is a JobPeerKey.
    """

    class State(models.TextChoices):
        DESIRED = "desired"
        ACTIVE = "active"
        REMOVING = "removing"
        REMOVED = "removed"

    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="job_peers")
    public_key = models.CharField(max_length=44)
    address = models.GenericIPAddressField(protocol="IPv4")
    allocation = models.OneToOneField(
        IpAllocation, null=True, blank=True, on_delete=models.SET_NULL, related_name="job_peer"
    )
    ref = models.CharField(max_length=64, unique=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.DESIRED)
    created_at = models.DateTimeField(default=timezone.now)
    added_revision = models.PositiveBigIntegerField()
    acked_at = models.DateTimeField(null=True, blank=True)
    removed_revision = models.PositiveBigIntegerField(null=True, blank=True)
    removed_at = models.DateTimeField(null=True, blank=True)
    # The public mapping of the buyer's WireGuard socket as the gateway's hub sees it (the
    # buyer's wg-quick file carries the hub as a second peer: meshnet.wgconfig, meshnet.hub),
    # and since when. The node's desired state sends toward it (coordinated punching,
    # docs/nat.md). Empty while no hub runs or the buyer's client never reached it.
    observed_endpoint = models.CharField(max_length=300, blank=True)
    observed_endpoint_at = models.DateTimeField(null=True, blank=True)
    # The node's latest ping of the buyer's tunnel address from its mesh address (a signed
    # ROUND_TRIPS report, meshnet.round_trips): when it was measured, and the round trip in
    # microseconds, null when the buyer's host did not answer. Both null: never measured.
    rtt_measured_at = models.DateTimeField(null=True, blank=True)
    rtt_us = models.PositiveIntegerField(null=True, blank=True)
    # The job group the key belongs to (PeerKeyClaim): the peer's own ref for a single job,
    # "cluster:<id>" for a part of a multi-node order, whose parts share the buyer's key and
    # tunnel address.
    key_group = models.CharField(max_length=64)
    key_claim = models.ForeignKey(
        PeerKeyClaim,
        to_field="token",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="peers",
    )

    objects = JobPeerQuerySet.as_manager()

    class Meta:
        constraints = [
            # A live peer holds its key's claim, and the claim is its key's and its group's:
            # so a key is live in one group at a time (PeerKeyClaim.public_key is unique).
            models.CheckConstraint(
                condition=(
                    Q(state="removed", key_claim__isnull=True)
                    | (
                        ~Q(state="removed")
                        & Q(key_claim_id=Concat(F("public_key"), Value(" "), F("key_group")))
                    )
                ),
                name="peer_live_holds_key_claim",
            ),
            # A node has a key as one peer (WireGuard knows a peer by its key).
            models.UniqueConstraint(
                fields=["public_key", "node"],
                condition=~Q(state="removed"),
                name="peer_key_live_once_per_node",
            ),
            # A single job's tunnel address is its own; a shared group's is the claim's lease
            # (one per claim), on each of its nodes once.
            models.UniqueConstraint(
                fields=["address"],
                condition=~Q(state="removed") & Q(key_group=F("ref")),
                name="peer_address_live_once",
            ),
            models.UniqueConstraint(
                fields=["address", "node"],
                condition=~Q(state="removed"),
                name="peer_address_live_once_per_node",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.ref} on {self.node.name} ({self.address}, {self.state})"

    def traffic_totals(self) -> tuple[int, int]:
        """(rx, tx) bytes metered for this peer: the sum over all the keys it has had."""
        totals = self.keys.aggregate(rx=Sum("total_rx_bytes"), tx=Sum("total_tx_bytes"))
        return totals["rx"] or 0, totals["tx"] or 0


class JobPeerKey(models.Model):
    """One WireGuard public key of a job peer, with the metering base and totals of that key.

    A peer has one current key (retired_at unset); a re-key retires it at the desired revision
    that drops it from the node and adds the next key. A key stays *open* (closed_at unset) until
    its final counters have been taken: the agent sends a removed key's last counters before it
    acknowledges the revision that removed it, on the same connection, so the gateway closes the
    key when that acknowledgement arrives (or when the node is revoked). Metering samples of the
    peer's node that carry an open key are billed to that key's peer, retired or not; a closed
    key counts nothing more. The peer's traffic is the sum over its keys.

    An open key belongs to one peer per node (a multi-node order's one key is open on each of
    its nodes), so a key reused later on the same node (another order, or the same key back)
    gets a new row only once the old one is closed: a node's sample is never ambiguous."""

    job_peer = models.ForeignKey(JobPeer, on_delete=models.CASCADE, related_name="keys")
    # The peer's node, kept here so the database can hold metering's rule per node: samples
    # are a node's, and a multi-node order's one key is open on each of its nodes.
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="peer_keys")
    public_key = models.CharField(max_length=44)
    # The last cumulative counters seen for this key: the base of its next delta.
    epoch = models.BigIntegerField(default=0)
    rx_bytes = models.BigIntegerField(default=0)
    tx_bytes = models.BigIntegerField(default=0)
    total_rx_bytes = models.BigIntegerField(default=0)
    total_tx_bytes = models.BigIntegerField(default=0)
    active_from = models.DateTimeField(default=timezone.now)
    added_revision = models.PositiveBigIntegerField()
    retired_at = models.DateTimeField(null=True, blank=True)
    retired_revision = models.PositiveBigIntegerField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    last_sample_at = models.DateTimeField(null=True, blank=True)
    # The sample that last moved the base (with last_sample_at, the agent's clock): a sample of
    # the same epoch older than it is stale (meshnet.metering.stale). Blank before the first
    # sample, and on keys based before these were kept (then only the clock orders them).
    base_boot_id = models.CharField(max_length=64, blank=True, default="")
    base_seq = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["job_peer_id", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["job_peer"],
                condition=Q(retired_at__isnull=True),
                name="peer_one_current_key",
            ),
            # Metering resolves a node's sample of a key to the one open row that has it on
            # that node: never two.
            models.UniqueConstraint(
                fields=["public_key", "node"],
                condition=Q(closed_at__isnull=True),
                name="peer_key_open_once_per_node",
            ),
            models.CheckConstraint(
                condition=Q(retired_at__isnull=True, retired_revision__isnull=True)
                | Q(retired_at__isnull=False, retired_revision__isnull=False),
                name="peer_key_retired_at_revision",
            ),
            models.CheckConstraint(
                condition=Q(total_rx_bytes__gte=0, total_tx_bytes__gte=0),
                name="peer_key_totals_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.public_key[:8]}… of {self.job_peer_id}"

    @property
    def current(self) -> bool:
        return self.retired_at is None

    @property
    def open(self) -> bool:
        return self.closed_at is None


class MeteringSample(models.Model):
    """Every signed metering sample, kept as received so a bill can be proved, for
    MOLT_METERING_RETENTION_DAYS (meshnet.tasks.prune_metering_samples). The unique
    (node, boot_id, seq) makes a resent sample count once."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="metering_samples")
    boot_id = models.CharField(max_length=64)
    seq = models.BigIntegerField()
    sampled_at = models.DateTimeField()
    received_at = models.DateTimeField(default=timezone.now)
    body = models.JSONField()
    signature = models.CharField(max_length=100)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["node", "boot_id", "seq"], name="metering_sample_once")
        ]
        indexes = [
            # An order's usage chart reads its node's samples within the order's time: without
            # this, every chart scans all the samples the node ever sent (8,640 a day).
            models.Index(fields=["node", "sampled_at"], name="metering_node_time_idx"),
            # Pruning by age (the gateway's clock, not the agent's) reads the oldest first.
            models.Index(fields=["received_at"], name="metering_received_idx"),
        ]

    def __str__(self) -> str:
        return f"sample {self.boot_id}/{self.seq} of {self.node_id}"


class NodeOutage(models.Model):
    """A silence of a node longer than MOLT_NODE_OFFLINE_AFTER_SECONDS: from its last heartbeat
    before the gap to the first one after it. Written by record_heartbeat when heartbeats resume,
    so every row is closed and exact; an outage still going on is last_seen_at to now. Billing
    leaves these intervals out of an order's time, and reliability counts them as downtime."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="outages")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField()

    class Meta:
        ordering = ["node_id", "started_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ended_at__gt=models.F("started_at")), name="outage_positive"
            ),
            # One outage per gap: the heartbeat that closes it compare-and-sets last_seen_at.
            models.UniqueConstraint(fields=["node", "started_at"], name="outage_once_per_gap"),
        ]
        indexes = [models.Index(fields=["node", "ended_at"], name="outage_node_end_idx")]

    def __str__(self) -> str:
        return (
            f"{self.node_id} offline {self.started_at:%Y-%m-%d %H:%M:%S}-{self.ended_at:%H:%M:%S}"
        )


class Sandbox(models.Model):
    """A job's container on a provider node: its image, GPUs, limits, address and the buyer's
    SSH keys, sent to the agent in the signed desired state (wire.SandboxSpec), and where it
    stands as the agent reports it (wire.SandboxReport).

    Named by `ref` like the job's peer ("order:<id>"), added and removed at the same desired
    revisions as the peer. Its GPUs are SandboxGpu rows, which a constraint gives to one live
    sandbox at a time.
    """

    class State(models.TextChoices):
        PENDING = "pending"  # in desired state, no report yet
        PULLING = "pulling"
        STARTING = "starting"
        READY = "ready"
        STOPPED = "stopped"
        FAILED = "failed"

    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="sandboxes")
    ref = models.CharField(max_length=64, unique=True)
    address = models.GenericIPAddressField(protocol="IPv4")
    allocation = models.OneToOneField(
        IpAllocation, null=True, blank=True, on_delete=models.SET_NULL, related_name="sandbox"
    )
    peer_address = models.GenericIPAddressField(protocol="IPv4")
    image = models.CharField(max_length=255)
    cpus_milli = models.PositiveIntegerField()
    memory_mb = models.PositiveIntegerField()
    disk_gb = models.PositiveIntegerField()
    pids_limit = models.PositiveIntegerField(default=4096)
    egress = models.BooleanField(default=True)
    ssh_keys = models.JSONField(default=list)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    detail = models.CharField(max_length=500, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    # As the agent reported them: [{index, name, uuid, ...}], ["ssh-ed25519 AAAA..."], [8888]
    gpus = models.JSONField(default=list, blank=True)
    host_keys = models.JSONField(default=list, blank=True)
    ports = models.JSONField(default=list, blank=True)
    added_revision = models.PositiveBigIntegerField()
    removed_revision = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    ready_at = models.DateTimeField(null=True, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)
    # The job's private network this sandbox belongs to ("cluster:<id>" for a part of a
    # multi-node order; blank: none): the live sandboxes of one group reach each other, across
    # nodes through job-scoped node-to-node peers (meshnet.mesh). Indexed: a node's desired
    # state looks up the other members of its sandboxes' groups.
    mesh_group = models.CharField(max_length=64, blank=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["address"],
                condition=Q(removed_revision__isnull=True),
                name="sandbox_address_live_once",
            ),
        ]

    def __str__(self) -> str:
        return f"sandbox {self.ref} on {self.node.name} ({self.address}, {self.state})"


class SandboxGpu(models.Model):
    """One GPU of a node given to a sandbox. Deleted when the sandbox leaves desired state; the
    unique constraint gives each GPU of a node to one sandbox at a time."""

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="assigned_gpus")
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="+")
    index = models.PositiveSmallIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["node", "index"], name="gpu_one_sandbox_at_a_time")
        ]

    def __str__(self) -> str:
        return f"GPU {self.index} of node {self.node_id}"


# Registered with the app from their own module (the relay's concern).
from meshnet.relay_models import Relay, RelayAllocation  # noqa: E402, F401
