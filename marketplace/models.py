"""Tables of the market. Money is integers of micro-USD, in a double-entry, append-only
ledger: balances on Account are a cache that every posting updates in the same transaction
under a guard, and the audit recomputes them from entries."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

# Re-exported, as the Stripe tables below: what a user's account holds besides money (API
# tokens, SSH keys), moved out to keep this module under 600 lines.
from marketplace.account_models import ApiToken, SshKey  # noqa: F401

# Multi-node orders (a Cluster of part orders) live in a module of their own, imported here
# so Django registers the model under this app (cluster_models imports nothing of this one).
from marketplace.cluster_models import Cluster  # noqa: F401

# Re-exported: the market's offers, moved out to keep this module under 600 lines.
from marketplace.listing_models import ON_OFFER, Listing  # noqa: F401
from marketplace.money import format_usd
from marketplace.querysets import OrderQuerySet

# Re-exported: Django registers models from the app's models module, and callers import
# marketplace.models.CheckoutSession. stripe_models refers to LedgerTransaction by name,
# so importing it here, before that class exists, is safe.
from marketplace.stripe_models import CheckoutSession, StripeEvent  # noqa: F401


class Account(models.Model):
    class Kind(models.TextChoices):
        WALLET = "wallet", "buyer wallet (available)"
        ESCROW = "escrow", "escrow hold of one order"
        EARNINGS = "earnings", "provider earnings"
        FEES = "fees", "platform fees"
        WORLD = "world", "outside world (deposits in, payouts out)"
        FROZEN = "frozen", "provider share of one settled order, frozen for the dispute window"
        PAYOUT = "payout", "one payout request, set aside until an operator pays or rejects it"

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
        PAYOUT = "payout", "provider payout paid to the outside world"
        REVERSAL = "reversal", "reversal of an earlier transaction"
        EARNED = "earned", "provider share released after the dispute window"
        DISPUTE = "dispute", "dispute resolved: refund to the buyer, rest to the provider"
        PAYOUT_REQUEST = "payout_req", "payout requested: earnings set aside"
        PAYOUT_REJECTED = "payout_rej", "payout request rejected: back to earnings"
        CARD = "card", "card top-up (Stripe Checkout)"
        PART_CAPTURE = "part_cap", "one part of a multi-node order captured from its hold"

    kind = models.CharField(max_length=10, choices=Kind.choices)
    memo = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Resolving a hold (capture or release) points here; unique => at most one resolution.
    resolves_hold = models.OneToOneField(
        "EscrowHold", null=True, blank=True, on_delete=models.PROTECT, related_name="resolution"
    )
    # A reversal names what it reverses; unique (below) => a transaction is reversed at most once.
    reverses = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="reversals"
    )
    # Every other exactly-once movement carries a key naming what it settles ("earnings:12" for
    # the release or dispute resolution of one frozen share, "payout:7" for paying or rejecting
    # one payout request): unique, so the second of two racing resolutions cannot be written.
    # NULL, not "", for "no key": NULLs are exempt from the unique index, empty strings are not.
    once_key = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001

    class Meta:
        # Partial unique indexes (NULLs exempt). Being partial also keeps SQLite from rebuilding
        # the table to add them, which would drop its append-only triggers.
        constraints = [
            models.UniqueConstraint(
                fields=["reverses"],
                condition=Q(reverses__isnull=False),
                name="ledger_reversed_once",
            ),
            models.UniqueConstraint(
                fields=["once_key"],
                condition=Q(once_key__isnull=False),
                name="ledger_once_key_unique",
            ),
        ]

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
        verbose_name_plural = "ledger entries"
        constraints = [models.CheckConstraint(condition=~Q(amount=0), name="entry_non_zero")]

    def __str__(self) -> str:
        # Admin titles, breadcrumbs and inlines show this: dollars, never the stored integer.
        sign = "+" if self.amount > 0 else ""
        return f"{sign}{format_usd(self.amount)} {self.account}"


class Order(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        PROVISIONING = "provisioning"
        RUNNING = "running"
        STOPPING = "stopping"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"
        DISPUTED = "disputed"
        RESOLVED = "resolved"

    LIVE_STATES = (State.PENDING, State.PROVISIONING, State.RUNNING, State.STOPPING)
    ENDED_STATES = (
        State.COMPLETED,
        State.CANCELLED,
        State.FAILED,
        State.DISPUTED,
        State.RESOLVED,
    )
    # Orders that reached completion: each has exactly one settlement.
    COMPLETED_STATES = (State.COMPLETED, State.DISPUTED, State.RESOLVED)

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
    # The sandbox's image (one of the listing's images) and the buyer's SSH public keys as they
    # were when the order was placed: a key added or deleted later changes no placed order.
    image = models.CharField(max_length=255, blank=True)
    ssh_keys = models.JSONField(default=list, blank=True)
    # A part of a multi-node order (marketplace.clusters): its cluster holds the one escrow
    # hold, and this order's hold_amount is its share of it. NULL for a single-node order.
    cluster = models.ForeignKey(
        "marketplace.Cluster",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="parts",
    )
    part_index = models.PositiveSmallIntegerField(null=True, blank=True)

    objects = OrderQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="order_gpus_positive"),
            models.CheckConstraint(condition=Q(hours__gte=1), name="order_hours_positive"),
            models.CheckConstraint(condition=Q(hold_amount__gte=0), name="order_hold_non_negative"),
            models.CheckConstraint(
                condition=Q(cluster__isnull=True, part_index__isnull=True)
                | Q(cluster__isnull=False, part_index__isnull=False),
                name="order_part_has_index",
            ),
            # One listing at most once per cluster (take more GPUs of it instead), and each
            # part's index once.
            models.UniqueConstraint(
                fields=["cluster", "listing"],
                condition=Q(cluster__isnull=False),
                name="cluster_listing_once",
            ),
            models.UniqueConstraint(
                fields=["cluster", "part_index"],
                condition=Q(cluster__isnull=False),
                name="cluster_part_index_once",
            ),
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

    # Whose hold: one single-node order's, or one multi-node order's (a Cluster: its parts'
    # settlements capture from it one by one, and the last part's end releases the rest).
    order = models.OneToOneField(
        Order, null=True, blank=True, on_delete=models.PROTECT, related_name="hold"
    )
    cluster = models.OneToOneField(
        "marketplace.Cluster", null=True, blank=True, on_delete=models.PROTECT, related_name="hold"
    )
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
            models.CheckConstraint(
                condition=Q(order__isnull=False, cluster__isnull=True)
                | Q(order__isnull=True, cluster__isnull=False),
                name="hold_of_order_or_cluster",
            ),
        ]

    def __str__(self) -> str:
        whose = f"order {self.order_id}" if self.order_id else f"cluster {self.cluster_id}"
        return f"hold of {whose}: {format_usd(self.amount)} ({self.state})"


class Settlement(models.Model):
    """What an ended order cost, once: the unique order makes settlement exactly-once."""

    order = models.OneToOneField(Order, on_delete=models.PROTECT, related_name="settlement")
    transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="settlement"
    )
    billed_seconds = models.BigIntegerField(help_text="seconds charged: online time only")
    offline_seconds = models.BigIntegerField(
        default=0, help_text="seconds of the booked span the provider node was offline (free)"
    )
    time_charge = models.BigIntegerField()
    bandwidth_bytes = models.BigIntegerField()
    bandwidth_charge = models.BigIntegerField()
    captured = models.BigIntegerField()
    fee = models.BigIntegerField()
    provider_amount = models.BigIntegerField()
    released = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"settlement of order {self.order_id}: captured {format_usd(self.captured)}"


class IdempotencyRecord(models.Model):
    """The first response to a money-moving POST, replayed for retries with the same key."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of method, path and body")
    status_code = models.PositiveSmallIntegerField(help_text="0 while the first is in flight")
    response_body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    # Who runs the request now: a random token, and since when. A crashed request's claim goes
    # stale after MOLT_IDEMPOTENCY_IN_FLIGHT_SECONDS and a retry takes it over; the response is
    # stored by compare-and-set on the token, in the same transaction as the request's writes.
    claim = models.CharField(max_length=32, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_once")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created_idx")]

    def __str__(self) -> str:
        return f"idempotency key of user {self.user_id}"


class EarningsHold(models.Model):
    """The provider's share of one settled order, frozen in an account of its own until the
    dispute window (MOLT_DISPUTE_WINDOW_SECONDS from settlement) passes; then it is released to
    the provider's earnings. If the buyer disputes in time it stays frozen until an operator
    resolves the dispute. Either way it is resolved once: the resolving LedgerTransaction
    carries the unique once_key "earnings:<id>"."""

    class State(models.TextChoices):
        FROZEN = "frozen"
        DISPUTED = "disputed"
        RELEASED = "released"
        RESOLVED = "resolved"

    order = models.OneToOneField(Order, on_delete=models.PROTECT, related_name="earnings_hold")
    provider = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="earnings_holds"
    )
    account = models.OneToOneField(Account, on_delete=models.PROTECT, related_name="earnings_hold")
    amount = models.BigIntegerField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.FROZEN)
    created_at = models.DateTimeField(default=timezone.now)
    release_after = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.OneToOneField(
        LedgerTransaction,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="resolved_earnings",
    )

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount__gte=0), name="earnings_hold_non_negative")
        ]
        indexes = [
            models.Index(fields=["state", "release_after"], name="earnings_hold_due_idx"),
        ]

    def __str__(self) -> str:
        return f"frozen share of order {self.order_id}: {format_usd(self.amount)} ({self.state})"


class Dispute(models.Model):
    """A buyer's dispute of a settled order (one per order). An operator resolves it by
    refunding part or all of what was captured; see payments.resolve_dispute."""

    class State(models.TextChoices):
        OPEN = "open"
        RESOLVED = "resolved"

    order = models.OneToOneField(Order, on_delete=models.PROTECT, related_name="dispute")
    buyer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="disputes"
    )
    reason = models.TextField(max_length=2000)
    state = models.CharField(max_length=10, choices=State.choices, default=State.OPEN)
    opened_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    refund = models.BigIntegerField(null=True, blank=True, help_text="micro-USD back to the buyer")
    resolution_note = models.CharField(max_length=500, blank=True)
    resolution = models.OneToOneField(
        LedgerTransaction,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="dispute_resolution",
    )

    class Meta:
        ordering = ["-opened_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(state="open", resolution__isnull=True, refund__isnull=True)
                | Q(state="resolved", resolution__isnull=False, refund__gte=0),
                name="dispute_resolved_with_refund",
            )
        ]

    def __str__(self) -> str:
        return f"dispute of order {self.order_id} ({self.state})"


class PayoutRequest(models.Model):
    """A provider asks for earnings to be paid out. The amount moves from earnings into an
    account of the request's own at once (so it cannot be spent twice); an operator then marks
    it paid (to the outside world) or rejects it (back to earnings), once: the resolving
    transaction carries the unique once_key "payout:<id>"."""

    class State(models.TextChoices):
        REQUESTED = "requested"
        PAID = "paid"
        REJECTED = "rejected"

    provider = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="payout_requests"
    )
    amount = models.BigIntegerField()
    account = models.OneToOneField(Account, on_delete=models.PROTECT, related_name="payout")
    state = models.CharField(max_length=10, choices=State.choices, default=State.REQUESTED)
    requested_at = models.DateTimeField(default=timezone.now)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    note = models.CharField(
        max_length=200, blank=True, help_text="payment reference, or why it was rejected"
    )
    request_transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="payout_request"
    )
    resolution = models.OneToOneField(
        LedgerTransaction,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="resolved_payout",
    )

    class Meta:
        ordering = ["-requested_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="payout_positive"),
            models.CheckConstraint(
                condition=Q(state="requested", resolution__isnull=True)
                | (~Q(state="requested") & Q(resolution__isnull=False)),
                name="payout_resolved_once",
            ),
        ]

    def __str__(self) -> str:
        return f"payout {self.pk} of {self.provider}: {format_usd(self.amount)} ({self.state})"


class NodeReliability(models.Model):
    """A node's track record, recomputed by the refresh-reliability beat task (see
    marketplace.reliability): jobs completed versus failed on it, and its heartbeat uptime over
    the last MOLT_RELIABILITY_WINDOW_SECONDS. `score` (0..100) is what listings show."""

    node = models.OneToOneField(
        "meshnet.Node", on_delete=models.CASCADE, related_name="reliability"
    )
    score = models.PositiveSmallIntegerField()
    jobs_completed = models.PositiveIntegerField()
    jobs_failed = models.PositiveIntegerField()
    uptime_bp = models.PositiveIntegerField(help_text="uptime in basis points (10000 = 100 %)")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "node reliabilities"
        constraints = [
            models.CheckConstraint(condition=Q(score__lte=100), name="reliability_at_most_100"),
            models.CheckConstraint(condition=Q(uptime_bp__lte=10_000), name="uptime_at_most_1"),
        ]
        indexes = [models.Index(fields=["score"], name="reliability_score_idx")]

    def __str__(self) -> str:
        return f"reliability of node {self.node_id}: {self.score}"


class AuditRun(models.Model):
    """One run of the ledger audit (`manage.py audit_ledger` or the hourly beat task): when,
    whether the books balanced, and what was wrong. The ops dashboard shows the latest."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    ok = models.BooleanField()
    violation_count = models.PositiveIntegerField(default=0)
    violations = models.TextField(blank=True, help_text="one violation per line")
    transaction_count = models.PositiveBigIntegerField(default=0)
    entry_count = models.PositiveBigIntegerField(default=0)
    duration_ms = models.PositiveIntegerField(default=0)
    source = models.CharField(max_length=20, default="command", help_text="command or beat")

    class Meta:
        ordering = ["-at", "-id"]
        get_latest_by = "at"

    def __str__(self) -> str:
        return f"audit {self.at:%Y-%m-%d %H:%M:%S}: {'OK' if self.ok else 'VIOLATIONS'}"
