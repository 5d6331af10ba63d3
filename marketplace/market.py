"""The market's offers as buyers browse them: the API's `GET listings/` and the marketplace page.

Both read a page of listings in one query, however deep the page and however many rows the
market has (docs/operations.md, "Read path"):
- keyset (cursor) pages: a page starts after the last row of the one before, in an index order
  (marketplace.models.Listing's partial indexes), so page 200 costs what page 1 costs; no
  OFFSET, and no COUNT of every row (the page counts at most COUNT_CAP rows);
- the columns a page shows come from `.values()` with the node, owner, reliability, GPUs in use
  and driver/CUDA versions joined or sub-selected in the same query (computed only for the
  rows of the page, since nothing is skipped), so there is no query per row and no model
  instances to build.

Offline nodes (no heartbeat within MOLT_NODE_OFFLINE_AFTER_SECONDS) are hidden unless asked
for; every row says whether its node is online and when it was last seen.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Exists, F, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from marketplace.models import Listing, Order
from meshnet.models import Gpu
from meshnet.versions import version_key

# name -> (the value the rows are ordered by, descending?). The id breaks ties in the same
# direction, so each order is total and each has an index the database can walk (or, for the
# computed ones, sorts only the filtered rows once).
SORTS: dict[str, tuple[str, bool]] = {
    "price_per_gpu_hour": ("price_per_gpu_hour", False),
    "-price_per_gpu_hour": ("price_per_gpu_hour", True),
    "price_per_gib": ("price_per_gib", False),
    "-price_per_gib": ("price_per_gib", True),
    "vram_gb": ("vram_gb", False),
    "-vram_gb": ("vram_gb", True),
    "gpu_count": ("gpu_count", False),
    "-gpu_count": ("gpu_count", True),
    # A node without a score yet sorts as -1: after every scored node, most reliable first.
    "reliability": ("reliability_key", False),
    "-reliability": ("reliability_key", True),
    "-gpus_free": ("gpus_free", True),
}
DEFAULT_SORT = "price_per_gpu_hour"
# A page's "N listings" counts at most this many rows ("1000+" past it): a bounded count.
COUNT_CAP = 1000


class BadQuery(ValueError):
    """A filter or cursor that cannot apply; `field` names the query parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def offline_cutoff(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(seconds=settings.MOLT_NODE_OFFLINE_AFTER_SECONDS)


def offers(
    base: QuerySet[Listing] | None = None, *, include_offline: bool = False
) -> QuerySet[Listing]:
    """`base` (default: the available listings) with what a page shows annotated, offline
    nodes' listings left out unless `include_offline`."""
    listings = Listing.objects.available() if base is None else base
    if not include_offline:
        listings = listings.filter(node__last_seen_at__gte=offline_cutoff())
    return listings.annotate(**_annotations())


@functools.cache
def _annotations() -> dict[str, Any]:
    """What offers() annotates, built once: annotate() resolves a copy of each expression, so
    they can be shared, and building the subqueries is a third of a page's Python time."""
    in_use = (
        Order.objects.live()
        .filter(listing=OuterRef("pk"))
        .order_by()
        .values("listing")
        .annotate(n=Sum("gpu_count"))
        .values("n")
    )
    gpus = Gpu.objects.filter(node=OuterRef("node_id"), name=OuterRef("gpu_model")).order_by()
    return {
        "gpus_in_use": Coalesce(Subquery(in_use), 0),
        "gpus_free": F("gpu_count") - F("gpus_in_use"),
        "reliability_key": Coalesce("node__reliability__score", Value(-1)),
        # The lowest version among the listing's GPUs: what every one of them has at least.
        "driver_version": Subquery(
            gpus.order_by(F("driver_version_key").asc(nulls_first=True)).values("driver_version")[
                :1
            ]
        ),
        "cuda_version": Subquery(
            gpus.order_by(F("cuda_version_key").asc(nulls_first=True)).values("cuda_version")[:1]
        ),
    }


def parse_min_version(field: str, text: str) -> int:
    key = version_key(text)
    if key is None:
        raise BadQuery(field, "must be a version such as 535.104 or 12.2 (up to three numbers)")
    return key


def with_min_versions(
    listings: QuerySet[Listing], *, driver: int | None = None, cuda: int | None = None
) -> QuerySet[Listing]:
    """Listings whose GPUs (of the listing's model on its node) all report at least these
    version keys (meshnet.versions); a GPU that reported none does not pass."""
    for field, minimum in (("driver_version_key", driver), ("cuda_version_key", cuda)):
        if minimum is None:
            continue
        below = Gpu.objects.filter(node=OuterRef("node_id"), name=OuterRef("gpu_model")).filter(
            Q(**{f"{field}__lt": minimum}) | Q(**{f"{field}__isnull": True})
        )
        listings = listings.filter(~Exists(below))
    return listings


ROW_FIELDS = (
    "id",
    "node_id",
    "node__name",
    "node__last_seen_at",
    "owner__username",
    "gpu_model",
    "vram_gb",
    "gpu_count",
    "gpus_in_use",
    "gpus_free",
    "price_per_gpu_hour",
    "price_per_gib",
    "region",
    "simulated",
    "is_active",
    "created_at",
    "node__reliability__score",
    "reliability_key",
    "images",
    "cpus_per_gpu",
    "memory_gb_per_gpu",
    "disk_gb",
    "egress",
    "driver_version",
    "cuda_version",
)


@dataclass(frozen=True)
class Cursor:
    """A position in one sort: the last (or, going back, first) row's sort value and id."""

    sort: str
    value: int
    pk: int
    backwards: bool = False

    def encode(self) -> str:
        raw = f"{self.sort}|{self.value}|{self.pk}|{'p' if self.backwards else 'n'}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, sort: str) -> Cursor:
        problem = BadQuery("cursor", "is not a cursor this list gave out; start from page one")
        if len(token) > 200:
            raise problem
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            name, value, pk, direction = raw.split("|")
            cursor = cls(name, int(value), int(pk), direction == "p")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise problem from None
        if direction not in ("n", "p") or abs(cursor.value) > 2**62 or not 0 < cursor.pk < 2**62:
            raise problem
        if cursor.sort != sort:
            raise BadQuery("cursor", "belongs to another ordering; start from the first page")
        return cursor


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next: Cursor | None
    previous: Cursor | None


def page(listings: QuerySet[Listing], sort: str, cursor: Cursor | None, size: int) -> Page:
    """One page of `listings` (from offers()) in `sort`, after (or, going back, before)
    `cursor`: one query of size + 1 rows."""
    key, descending = SORTS[sort]
    backwards = cursor is not None and cursor.backwards
    # Walking back runs the same order reversed from the cursor, then flips the rows.
    down = descending != backwards
    if cursor is not None:
        beyond = "lt" if down else "gt"
        at_or_beyond = "lte" if down else "gte"
        # The first condition alone is the index range's start; the OR picks the exact row.
        listings = listings.filter(**{f"{key}__{at_or_beyond}": cursor.value}).filter(
            Q(**{f"{key}__{beyond}": cursor.value})
            | Q(**{key: cursor.value, f"pk__{beyond}": cursor.pk})
        )
    order = (F(key).desc(), F("pk").desc()) if down else (F(key).asc(), F("pk").asc())
    rows = list(listings.order_by(*order).values(*ROW_FIELDS)[: size + 1])
    more = len(rows) > size
    rows = rows[:size]
    if backwards:
        rows.reverse()
    if not rows:
        return Page(rows, None, None)

    def at(row: dict[str, Any], back: bool) -> Cursor:
        return Cursor(sort, row[key], row["id"], back)

    if backwards:
        return Page(rows, at(rows[-1], False), at(rows[0], True) if more else None)
    return Page(rows, at(rows[-1], False) if more else None, at(rows[0], True) if cursor else None)


def bounded_count(listings: QuerySet[Listing]) -> tuple[int, bool]:
    """How many rows `listings` has, counting at most COUNT_CAP + 1: (count, capped)."""
    n = listings.order_by().values("pk")[: COUNT_CAP + 1].count()
    return min(n, COUNT_CAP), n > COUNT_CAP


def api_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cutoff = offline_cutoff()
    return [api_row(row, cutoff) for row in rows]


def api_row(row: dict[str, Any], cutoff: datetime) -> dict[str, Any]:
    """A row of page() as the API shows a listing (marketplace.api.serializers.ListingSerializer
    documents the same shape; a test holds the two equal)."""
    seen = row["node__last_seen_at"]
    return {
        "id": row["id"],
        "node": {"id": row["node_id"], "name": row["node__name"]},
        "owner": row["owner__username"],
        "gpu_model": row["gpu_model"],
        "vram_gb": row["vram_gb"],
        "gpu_count": row["gpu_count"],
        "gpus_available": max(row["gpu_count"] - row["gpus_in_use"], 0),
        "price_per_gpu_hour": row["price_per_gpu_hour"],
        "price_per_gib": row["price_per_gib"],
        "region": row["region"],
        "simulated": row["simulated"],
        "is_active": row["is_active"],
        "created_at": iso(row["created_at"]),
        "reliability": row["node__reliability__score"],
        "images": row["images"],
        "cpus_per_gpu": row["cpus_per_gpu"],
        "memory_gb_per_gpu": row["memory_gb_per_gpu"],
        "disk_gb": row["disk_gb"],
        "egress": row["egress"],
        "online": seen is not None and seen >= cutoff,
        "last_seen_at": iso(seen),
        "driver_version": row["driver_version"] or "",
        "cuda_version": row["cuda_version"] or "",
    }


def iso(value: datetime | None) -> str | None:
    """A datetime as DRF's DateTimeField writes it (the current time zone, "Z" for UTC)."""
    if value is None:
        return None
    if settings.USE_TZ and settings.TIME_ZONE != "UTC":  # rows come from the database in UTC
        value = timezone.localtime(value)
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
