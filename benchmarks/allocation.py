"""Allocation at scale: lease the whole MOLT range (32,766 addresses) on PostgreSQL and print
JSON figures.

    .venv/bin/python benchmarks/allocation.py
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/other .venv/bin/python benchmarks/allocation.py

(default DATABASE_URL: postgres://postgres@127.0.0.1:5432/molt_bench)

What it measures, all on one connection, one transaction per call:
- `allocate_address("molt", ...)` 32,766 times from an empty pool: per-call latency
  percentiles of the first and the last 1,000 calls and their ratio. Allocation takes the next
  fresh offset under the pool row lock, so the last 1,000 should cost what the first did; a
  ratio well above 1 would mean a per-call cost that grows with the pool (a scan).
- the next call, which must raise PoolExhausted (the API's 409);
- 1,000 allocations on the reuse path: 1,000 leases released with no quarantine, then leased
  again (the oldest released first, by an index range read, not a pool scan);
- a baseline in the same run: a bare one-row INSERT per transaction into a scratch table on the
  same connection, so the figures above read as "locking and bookkeeping on top of the cheapest
  possible write".

The database is created and migrated if needed; the MOLT pool's rows are deleted before and
after (use a database of its own: this one must not hold real leases), and the scratch table
is dropped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/molt_bench")

SAMPLE = 1000


def ensure_database(url: str) -> None:
    """CREATE DATABASE if it does not exist (connecting to the server's `postgres` database)."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean of latencies given in seconds, reported in microseconds."""
    cuts = statistics.quantiles(samples_s, n=100, method="inclusive")
    return {
        "p50_us": round(cuts[49] * 1e6, 1),
        "p95_us": round(cuts[94] * 1e6, 1),
        "p99_us": round(cuts[98] * 1e6, 1),
        "mean_us": round(statistics.fmean(samples_s) * 1e6, 1),
    }


def main() -> int:
    url = os.environ["DATABASE_URL"]
    if not url.startswith(("postgres://", "postgresql://")):
        print("this benchmark needs PostgreSQL: set DATABASE_URL=postgres://...", file=sys.stderr)
        return 2
    ensure_database(url)

    import django

    django.setup()

    from django.conf import settings

    # DJANGO_DEBUG=true only supplies a development SECRET_KEY here; with DEBUG on, Django would
    # also record every query, a cost that is not the allocator's.
    settings.DEBUG = False
    from django.core.management import call_command
    from django.db import connection, transaction

    from meshnet import ipplan
    from meshnet.allocation import allocate_address, release_address
    from meshnet.errors import PoolExhausted
    from meshnet.models import IpAllocation, IpPool

    call_command("migrate", verbosity=0)

    def reset_pool() -> None:
        with transaction.atomic():
            IpAllocation.objects.filter(pool__name=ipplan.MOLT_POOL).delete()
            IpPool.objects.filter(name=ipplan.MOLT_POOL).delete()

    if IpAllocation.objects.filter(pool__name=ipplan.MOLT_POOL).exclude(node=None).exists():
        print("this database has enrolled nodes holding MOLT leases; use another", file=sys.stderr)
        return 2
    reset_pool()
    # The cost of the first lease of a pool includes creating its row; take it out of the
    # sample by creating the row before timing starts.
    IpPool.objects.create(name=ipplan.MOLT_POOL, cidr=ipplan.block(ipplan.MOLT_POOL).cidr)
    total = ipplan.usable_count(ipplan.block(ipplan.MOLT_POOL).network)

    try:
        # Baseline: the cheapest write, one row per transaction, same connection.
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS bench_scratch")
            cursor.execute("CREATE TABLE bench_scratch (id bigserial PRIMARY KEY, v integer)")
        baseline: list[float] = []
        for i in range(SAMPLE * 2):
            t0 = time.perf_counter()
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("INSERT INTO bench_scratch (v) VALUES (%s)", [i])
            baseline.append(time.perf_counter() - t0)

        latencies: list[float] = []
        started = time.perf_counter()
        for _ in range(total):
            t0 = time.perf_counter()
            allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started

        try:
            allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB)
            exhausted = "no error: BUG"
        except PoolExhausted as exc:
            exhausted = f"PoolExhausted ({exc.status_code}): {exc}"

        # The reuse path: release SAMPLE leases with no quarantine and lease them again.
        settings.MOLT_ADDRESS_QUARANTINE_SECONDS = 0
        released = list(
            IpAllocation.objects.filter(pool__name=ipplan.MOLT_POOL).order_by("?")[:SAMPLE]
        )
        for lease in released:
            release_address(lease)
        reuse: list[float] = []
        for _ in range(SAMPLE):
            t0 = time.perf_counter()
            allocate_address(ipplan.MOLT_POOL, IpAllocation.Purpose.JOB)
            reuse.append(time.perf_counter() - t0)

        leased = IpAllocation.objects.filter(pool__name=ipplan.MOLT_POOL, released_at=None)
        distinct = leased.values("address").distinct().count()
        first = percentiles(latencies[:SAMPLE])
        last = percentiles(latencies[-SAMPLE:])
        base = percentiles(baseline)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            server_version = cursor.fetchone()[0]
        result = {
            "benchmark": "allocation",
            "database": f"PostgreSQL {server_version}",
            "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
            "pool": f"{ipplan.MOLT_POOL} {ipplan.block(ipplan.MOLT_POOL).cidr}",
            "allocations": len(latencies),
            "distinct_addresses_leased": distinct,
            "total_s": round(elapsed, 2),
            "allocations_per_s": round(len(latencies) / elapsed, 1),
            "first_1000": first,
            "last_1000": last,
            "last_over_first": {
                k: round(last[k] / first[k], 3) for k in ("p50_us", "p95_us", "p99_us")
            },
            "reuse_after_quarantine_1000": percentiles(reuse),
            "next_allocation": exhausted,
            "baseline_insert_per_txn": base,
            "allocation_over_baseline_p50": round(first["p50_us"] / base["p50_us"], 2),
        }
        print(json.dumps(result, indent=2))
        return 0 if exhausted.startswith("PoolExhausted") and distinct == total else 1
    finally:
        reset_pool()
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS bench_scratch")


if __name__ == "__main__":
    sys.exit(main())
