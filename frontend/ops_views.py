"""The operators' dashboard, /ops/ (staff only): the state of the mesh and the market on one
page, with its charts drawn here as inline SVG (no chart library, nothing from elsewhere).

Every figure is one aggregate query over its table, never a query per node, order or day, so
the page costs the same number of queries whatever the size of the data
(tests/db/test_ops_figures.py checks this at one and ten times the demo market; the time is
measured by benchmarks/pages.py). The ledger audit shown is the latest stored AuditRun (the
audit command and the hourly beat task keep one); the page runs the audit itself only while
none exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count, F, Q, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from frontend.templatetags.molt_format import iec_bytes, usd
from marketplace.audit import audit_ledger, ledger_counts
from marketplace.models import (
    Account,
    AuditRun,
    Dispute,
    EscrowHold,
    LedgerEntry,
    Order,
    PayoutRequest,
)
from meshnet import ipplan
from meshnet.models import Gpu, IpAllocation, IpPool, Node, Relay

CHART_DAYS = 14
RECENT = 10


# --- charts (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    text: str
    value: int


@dataclass(frozen=True)
class BarChart:
    """A bar chart in a `width` x `height` viewBox: one bar per point, scaled to the largest
    value (`peak_text` labels the top line); `empty` when every value is zero."""

    width: int
    height: int
    bars: tuple[Bar, ...]
    baseline: float
    peak_text: str
    first_label: str
    last_label: str
    total_text: str
    empty: bool


def bar_chart(
    points: Sequence[tuple[str, int]],
    fmt: Callable[[int], str],
    *,
    width: int = 640,
    height: int = 160,
    gap: float = 2.0,
) -> BarChart:
    """Bars for (label, value) points, left to right. Negative values draw as zero."""
    top = 8.0  # room for the peak line's stroke
    baseline = height - 1.0
    peak = max((value for _, value in points), default=0)
    slot = width / max(len(points), 1)
    bars = []
    for i, (label, value) in enumerate(points):
        shown = max(value, 0)
        bar_height = (baseline - top) * shown / peak if peak > 0 else 0.0
        # A non-zero value never rounds away to an invisible bar.
        if shown and bar_height < 1.5:
            bar_height = 1.5
        bars.append(
            Bar(
                x=round(i * slot + gap / 2, 2),
                y=round(baseline - bar_height, 2),
                width=round(max(slot - gap, 1.0), 2),
                height=round(bar_height, 2),
                label=label,
                text=fmt(value),
                value=value,
            )
        )
    return BarChart(
        width=width,
        height=height,
        bars=tuple(bars),
        baseline=baseline,
        peak_text=fmt(peak),
        first_label=points[0][0] if points else "",
        last_label=points[-1][0] if points else "",
        total_text=fmt(sum(value for _, value in points)),
        empty=peak <= 0,
    )


def daily_points(rows: dict[date, int], last_day: date, days: int) -> list[tuple[str, int]]:
    """`days` consecutive days ending at `last_day`, zero where `rows` has nothing."""
    first = last_day - timedelta(days=days - 1)
    return [
        ((first + timedelta(days=i)).isoformat(), int(rows.get(first + timedelta(days=i), 0)))
        for i in range(days)
    ]


# --- figures (one aggregate query each) ----------------------------------------------------------


def node_figures(now) -> dict:
    cutoff = now - timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)
    active = Q(revoked_at__isnull=True)
    figures = Node.objects.aggregate(
        active=Count("id", filter=active),
        online=Count("id", filter=active & Q(last_seen_at__gte=cutoff)),
        never_seen=Count("id", filter=active & Q(last_seen_at__isnull=True)),
        revoked=Count("id", filter=~active),
        lagging=Count("id", filter=active & Q(acked_revision__lt=F("desired_revision"))),
    )
    figures["offline"] = figures["active"] - figures["online"]
    gpus = Gpu.objects.filter(node__revoked_at__isnull=True).aggregate(
        total=Count("id"),
        online=Count("id", filter=Q(node__last_seen_at__gte=cutoff)),
        simulated=Count("id", filter=Q(simulated=True)),
    )
    figures["gpus"] = gpus
    return figures


def job_figures() -> dict:
    counts = dict(Order.objects.values_list("state").annotate(n=Count("id")).order_by())
    states = [(state.value, counts.get(state.value, 0)) for state in Order.State]
    return {
        "states": states,
        "live": sum(counts.get(state, 0) for state in Order.LIVE_STATES),
        "total": sum(counts.values()),
        "chart": bar_chart(states, str, height=120),
    }


@dataclass(frozen=True)
class PoolUse:
    name: str
    cidr: str
    purpose: str
    size: int  # usable addresses
    handed_out: int  # fresh offsets used so far (next_offset - 1)
    live: int  # leases in use now
    quarantined: int  # released, not reusable yet

    @property
    def live_pct(self) -> float:
        return round(100 * self.live / self.size, 2) if self.size else 0.0

    @property
    def handed_out_pct(self) -> float:
        return round(100 * self.handed_out / self.size, 2) if self.size else 0.0


def pool_figures(now) -> list[PoolUse]:
    """The MOLT (nodes), jobs and workload pools of the IP plan: a pool's row exists from its
    first lease."""
    rows = {pool.name: pool for pool in IpPool.objects.all()}
    leases = {
        row["pool__name"]: row
        for row in IpAllocation.objects.values("pool__name")
        .annotate(
            live=Count("id", filter=Q(released_at__isnull=True)),
            quarantined=Count("id", filter=Q(released_at__isnull=False, reusable_after__gt=now)),
        )
        .order_by()
    }
    result = []
    # The node blocks (MOLT and each region's: one running out leaves the others), then jobs.
    for name in (ipplan.MOLT_POOL, *ipplan.REGIONS, ipplan.JOB_BLOCK, ipplan.WORKLOAD_POOL):
        block = ipplan.block(name)
        pool = rows.get(name)
        counted = leases.get(name, {})
        result.append(
            PoolUse(
                name=name,
                cidr=block.cidr,
                purpose=block.purpose,
                size=ipplan.usable_count(block.network),
                handed_out=(pool.next_offset - 1) if pool else 0,
                live=counted.get("live", 0),
                quarantined=counted.get("quarantined", 0),
            )
        )
    return result


def path_figures() -> dict:
    """How running orders' tunnels run (docs/nat.md): direct, or through a relay (a job peer
    with a RelayAllocation). One aggregate; an order without a job peer yet has no path."""
    running = Order.objects.filter(state=Order.State.RUNNING, job_peer__isnull=False)
    counts = running.aggregate(
        total=Count("id"), relayed=Count("id", filter=Q(job_peer__relay_allocation__isnull=False))
    )
    total, relayed = counts["total"], counts["relayed"]
    return {
        "total": total,
        "relayed": relayed,
        "direct": total - relayed,
        "direct_pct": round(100 * (total - relayed) / total) if total else None,
    }


@dataclass(frozen=True)
class RelayLoad:
    name: str
    region: str
    address: str
    enabled: bool
    pairs: int  # port pairs allocated now (the gateway's count)
    ports: int  # pairs its port range holds
    last_seen_at: object  # its last poll, None if it never polled
    live: bool  # enabled and polled within MOLT_RELAY_LIVE_SECONDS: new orders may use it
    reported_pairs: int | None  # what its last poll reported (None: nothing reported)
    handshaken: int | None
    # Forwarded as its last poll reported: Python's count since each pair opened plus the
    # kernel's for the pair's current fast path (it restarts when a side moves).
    bytes: int | None
    fast_path: bool | None

    @property
    def health(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.last_seen_at is None:
            return "never polled"
        return "live" if self.live else "silent"


def relay_loads(now) -> list[RelayLoad]:
    """Each listed relay with its allocated pairs (one query with a count) and what its last
    poll reported (Relay.last_status, meshnet.relays._trim_status: per pair, handshaken and
    bytes; no query per relay)."""
    since = now - timedelta(seconds=settings.MOLT_RELAY_LIVE_SECONDS)
    rows = Relay.objects.annotate(pairs=Count("allocations")).order_by("region", "name")
    result = []
    for relay in rows:
        status = relay.last_status if isinstance(relay.last_status, dict) else {}
        reported = status.get("pairs")
        reported = reported if isinstance(reported, list) else None
        result.append(
            RelayLoad(
                name=relay.name,
                region=relay.region,
                address=relay.address,
                enabled=relay.enabled,
                pairs=relay.pairs,
                ports=(relay.port_high - relay.port_low + 1) // 2,
                last_seen_at=relay.last_seen_at,
                live=bool(
                    relay.enabled
                    and relay.token_hash
                    and relay.last_seen_at is not None
                    and relay.last_seen_at >= since
                ),
                reported_pairs=len(reported) if reported is not None else None,
                handshaken=sum(1 for p in reported if p.get("handshaken"))
                if reported is not None
                else None,
                bytes=sum(int(p.get("bytes") or 0) for p in reported)
                if reported is not None
                else None,
                fast_path=status.get("fast_path") if "fast_path" in status else None,
            )
        )
    return result


def money_figures(today: date) -> dict:
    # What the open holds' escrow accounts hold: a multi-node order's hold less its parts'
    # captures so far (for a single order's open hold, its amount).
    escrow = EscrowHold.objects.filter(state=EscrowHold.State.OPEN).aggregate(
        amount=Coalesce(Sum("account__balance"), 0), holds=Count("id")
    )
    fees_balance = (
        Account.objects.filter(kind=Account.Kind.FEES).values_list("balance", flat=True).first()
    ) or 0
    since = today - timedelta(days=CHART_DAYS - 1)
    fees_by_day = dict(
        LedgerEntry.objects.filter(
            account__kind=Account.Kind.FEES, transaction__created_at__date__gte=since
        )
        .annotate(day=TruncDate("transaction__created_at"))
        .values_list("day")
        .annotate(total=Sum("amount"))
        .order_by()
    )
    return {
        "escrow": escrow,
        "fees_balance": fees_balance,
        "revenue_chart": bar_chart(daily_points(fees_by_day, today, CHART_DAYS), usd),
    }


def bandwidth_figures(today: date) -> dict:
    """Tunnel bytes (both directions) of orders that ended, by the day they ended, and what
    live orders have moved so far. Bytes are counted onto orders from signed metering samples
    (marketplace.orders.add_traffic); an order's bytes are dated when it ends."""
    since = today - timedelta(days=CHART_DAYS - 1)
    moved = F("bytes_in") + F("bytes_out")
    ended_by_day = dict(
        Order.objects.filter(ended_at__date__gte=since)
        .annotate(day=TruncDate("ended_at"))
        .values_list("day")
        .annotate(total=Sum(moved))
        .order_by()
    )
    live = Order.objects.live().aggregate(total=Coalesce(Sum(moved), 0))["total"]
    return {
        "chart": bar_chart(daily_points(ended_by_day, today, CHART_DAYS), iec_bytes),
        "live_bytes": live,
    }


def queues() -> dict:
    """What waits for an operator, oldest first: open disputes (the provider's share of each is
    frozen until one is resolved) and requested payouts (the earnings are set aside). The first
    RECENT of each and how many in all (one aggregate each)."""
    disputes = Dispute.objects.filter(state=Dispute.State.OPEN)
    payouts = PayoutRequest.objects.filter(state=PayoutRequest.State.REQUESTED)
    payout_totals = payouts.aggregate(n=Count("id"), amount=Coalesce(Sum("amount"), 0))
    return {
        "disputes": list(
            disputes.select_related("buyer", "order__settlement").order_by("opened_at", "id")[
                :RECENT
            ]
        ),
        "disputes_count": disputes.count(),
        "payouts": list(payouts.select_related("provider").order_by("requested_at", "id")[:RECENT]),
        "payouts_count": payout_totals["n"],
        "payouts_amount": payout_totals["amount"],
    }


def recent_failures() -> dict:
    # Failures only: an order its buyer (or an operator) cancelled did not fail.
    orders = (
        Order.objects.filter(state=Order.State.FAILED)
        .select_related("buyer", "listing__node")
        .order_by(F("ended_at").desc(nulls_last=True), "-id")[:RECENT]
    )
    reports = (
        Node.objects.exclude(last_report="")
        .select_related("owner")
        .order_by(F("last_report_at").desc(nulls_last=True), "-id")[:RECENT]
    )
    return {"orders": list(orders), "reports": list(reports)}


def ledger_audit() -> dict:
    """The latest stored audit (AuditRun: `manage.py audit_ledger` and the hourly beat task
    write one). Before any run exists, the audit runs now, once per page load, and says so."""
    run = AuditRun.objects.order_by("-at", "-id").first()
    if run is not None:
        violations = run.violations.splitlines()
        return {
            "stored": True,
            "ok": run.ok,
            "violations": violations[:20],
            "violation_count": run.violation_count,
            "transactions": run.transaction_count,
            "entries": run.entry_count,
            "ms": run.duration_ms,
            "at": run.at,
            "source": run.source,
        }
    started = time.perf_counter()
    violations = audit_ledger()
    transactions, entries = ledger_counts()
    return {
        "stored": False,
        "ok": not violations,
        "violations": violations[:20],
        "violation_count": len(violations),
        "transactions": transactions,
        "entries": entries,
        "ms": round((time.perf_counter() - started) * 1000),
        "at": timezone.now(),
        "source": "this page",
    }


@staff_member_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    today = timezone.localdate(now)
    return render(
        request,
        "frontend/ops/dashboard.html",
        {
            "nodes": node_figures(now),
            "jobs": job_figures(),
            "pools": pool_figures(now),
            "paths": path_figures(),
            "relays": relay_loads(now),
            "money": money_figures(today),
            "bandwidth": bandwidth_figures(today),
            "failures": recent_failures(),
            "queues": queues(),
            "audit": ledger_audit(),
            "now": now,
            "chart_days": CHART_DAYS,
        },
    )
