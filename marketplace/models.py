"""Tables of the market. Money is integers of micro-USD, in a double-entry, append-only
ledger: balances on Account are a cache that every posting updates in the same transaction
under a guard, and the audit recomputes them from entries."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from marketplace.querysets import ListingQuerySet, OrderQuerySet


class ApiToken(models.Model):
    """An API token: `molt_` + secret; only its SHA-256 is stored."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, blank=True)
    token_hash = models.CharField(max_length=64, unique=True)
    hint = models.CharField(max_length=16)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.hint}… ({self.user})"


class Account(models.Model):
    class Kind(models.TextChoices):
        WALLET = "wallet", "buyer wallet (available)"
        ESCROW = "escrow", "escrow hold of one order"
        EARNINGS = "earnings", "provider earnings"
        FEES = "fees", "platform fees"
        WORLD = "world", "outside world (deposits in, payouts out)"

    kind = models.CharField(max_length=10, choices=Kind.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="accounts",
    )
    balance = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            # Only the outside world may go negative (it is where credits come from).
            models.CheckConstraint(
                condition=Q(kind="world") | Q(balance__gte=0), name="account_non_negative"
            ),
            models.UniqueConstraint(
                fields=["user", "kind"],
                condition=Q(kind__in=["wallet", "earnings"]),
                name="one_wallet_and_earnings_per_user",
            ),
            models.UniqueConstraint(
                fields=["kind"], condition=Q(kind__in=["fees", "world"]), name="one_system_account"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.user or ''} #{self.pk}".strip()


class LedgerTransaction(models.Model):
    class Kind(models.TextChoices):
        GRANT = "grant", "credits granted"
        HOLD = "hold", "escrow hold placed"
        CAPTURE = "capture", "escrow captured (settlement)"
        RELEASE = "release", "escrow released in full"
        PAYOUT = "payout", "provider payout"
        REVERSAL = "reversal", "reversal of an earlier transaction"

    kind = models.CharField(max_length=10, choices=Kind.choices)
    memo = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Resolving a hold (capture or release) points here; unique => at most one resolution.
    resolves_hold = models.OneToOneField(
        "EscrowHold", null=True, blank=True, on_delete=models.PROTECT, related_name="resolution"
    )

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk}"


class LedgerEntry(models.Model):
    """One leg of a transaction. Append-only: database triggers refuse UPDATE and DELETE."""

    transaction = models.ForeignKey(
        LedgerTransaction, on_delete=models.PROTECT, related_name="entries"
    )
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="entries")
    amount = models.BigIntegerField()

    class Meta:
        constraints = [models.CheckConstraint(condition=~Q(amount=0), name="entry_non_zero")]

    def __str__(self) -> str:
        return f"{self.amount:+d} {self.account}"


class Listing(models.Model):
    """GPUs of one node offered at a price. The GPU model comes from the node's inventory."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="listings"
    )
    node = models.ForeignKey("meshnet.Node", on_delete=models.PROTECT, related_name="listings")
    gpu_model = models.CharField(max_length=100)
    vram_gb = models.PositiveIntegerField()
    gpu_count = models.PositiveIntegerField()
    price_per_gpu_hour = models.BigIntegerField(help_text="micro-USD per GPU-hour")
    price_per_gib = models.BigIntegerField(help_text="micro-USD per GiB of tunnel traffic")
    region = models.CharField(max_length=16, blank=True)
    simulated = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = ListingQuerySet.as_manager()

    class Meta:
        ordering = ["price_per_gpu_hour", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="listing_gpus_positive"),
            models.CheckConstraint(
                condition=Q(price_per_gpu_hour__gte=0), name="listing_price_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(price_per_gib__gte=0), name="listing_gib_price_non_negative"
            ),
        ]
        indexes = [
            models.Index(fields=["gpu_model", "price_per_gpu_hour"], name="listing_model_price_idx")
        ]

    def __str__(self) -> str:
        return f"{self.gpu_count} x {self.gpu_model} on {self.node}"


class Order(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        PROVISIONING = "provisioning"
        RUNNING = "running"
        STOPPING = "stopping"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"

    LIVE_STATES = (State.PENDING, State.PROVISIONING, State.RUNNING, State.STOPPING)
    ENDED_STATES = (State.COMPLETED, State.CANCELLED, State.FAILED)

    buyer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders"
    )
    listing = models.ForeignKey(Listing, on_delete=models.PROTECT, related_name="orders")
    gpu_count = models.PositiveIntegerField()
    hours = models.PositiveIntegerField()
    wireguard_public_key = models.CharField(max_length=44)
    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING)
    # Prices are copied at order time: a later listing edit never changes a placed order.
    price_per_gpu_hour = models.BigIntegerField()
    price_per_gib = models.BigIntegerField()
    bandwidth_allowance_bytes = models.BigIntegerField()
    hold_amount = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    running_since = models.DateTimeField(null=True, blank=True)
    ends_at = models.DateTimeField(null=True, blank=True)
    stop_requested_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    job_peer = models.OneToOneField(
        "meshnet.JobPeer", null=True, blank=True, on_delete=models.PROTECT, related_name="order"
    )
    reason = models.CharField(max_length=200, blank=True)

    objects = OrderQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="order_gpus_positive"),
            models.CheckConstraint(condition=Q(hours__gte=1), name="order_hours_positive"),
            models.CheckConstraint(condition=Q(hold_amount__gte=0), name="order_hold_non_negative"),
        ]
        indexes = [models.Index(fields=["state", "ends_at"], name="order_state_ends_idx")]

    def __str__(self) -> str:
        return f"order {self.pk} ({self.state})"


class OrderTransition(models.Model):
    """Every lifecycle change, with why. Written in the same transaction as the change."""

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="transitions")
    from_state = models.CharField(max_length=12)
    to_state = models.CharField(max_length=12)
    reason = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"order {self.order_id}: {self.from_state or '-'} -> {self.to_state}"


class EscrowHold(models.Model):
    """A two-phase transfer: placed with the order, resolved at most once (capture up to the
    amount with the rest released, or full release). The resolution is the LedgerTransaction
    whose unique `resolves_hold` points here."""

    class State(models.TextChoices):
        OPEN = "open"
        CAPTURED = "captured"
        RELEASED = "released"

    order = models.OneToOneField(Order, on_delete=models.PROTECT, related_name="hold")
    account = models.OneToOneField(Account, on_delete=models.PROTECT, related_name="hold")
    amount = models.BigIntegerField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.OPEN)
    created_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount__gte=0), name="hold_non_negative"),
            models.CheckConstraint(
                condition=Q(state="open", resolved_at__isnull=True)
                | (~Q(state="open") & Q(resolved_at__isnull=False)),
                name="hold_resolved_time",
            ),
        ]

    def __str__(self) -> str:
        return f"hold of order {self.order_id}: {self.amount} ({self.state})"


class Settlement(models.Model):
    """What an ended order cost, once: the unique order makes settlement exactly-once."""

    order = models.OneToOneField(Order, on_delete=models.PROTECT, related_name="settlement")
    transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="settlement"
    )
    billed_seconds = models.BigIntegerField()
    time_charge = models.BigIntegerField()
    bandwidth_bytes = models.BigIntegerField()
    bandwidth_charge = models.BigIntegerField()
    captured = models.BigIntegerField()
    fee = models.BigIntegerField()
    provider_amount = models.BigIntegerField()
    released = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"settlement of order {self.order_id}: captured {self.captured}"


class IdempotencyRecord(models.Model):
    """The first response to a money-moving POST, replayed for retries with the same key."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of method, path and body")
    status_code = models.PositiveSmallIntegerField()
    response_body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_once")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created_idx")]

    def __str__(self) -> str:
        return f"idempotency key of user {self.user_id}"
