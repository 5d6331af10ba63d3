"""A simulated day of job starts against the real allocator: does the MOLT /17 hold 20 job starts
a second for 24 hours, with the old one-day quarantine and with the new 120 s one?

    .venv/bin/python benchmarks/address_day.py

(PostgreSQL; default DATABASE_URL postgres://postgres@127.0.0.1:5432/molt_bench, created and
migrated if needed; its scratch pool is deleted before and after.)

The real `allocate_address` and `release_address` run, one transaction each, under a simulated
clock (meshnet.allocation's `timezone.now`), on a scratch pool scaled down from the /17: a /24
(254 addresses) at 20 x 254 / 32,766 starts a second. The allocator decides only from counts
and times (fresh offsets first, then the released lease whose quarantine ended first), so a
pool k times smaller at a rate k times lower fills and empties at the same moments: the scaled
day is the full day's behaviour at 1/129 of the calls (13,400 instead of 1.7 million per
scenario). Each job holds its address `job_seconds`, then is released into quarantine.

The baseline in the same run is the queueing model the allocator should meet: in steady state
a pool holds rate x (job_seconds + quarantine) leases, so it is exhausted exactly when that
exceeds its size. Exit 0 when every simulated scenario agrees with the model.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import os
import platform
import sys
import time
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/molt_bench")

sys.path.insert(0, str(REPO / "benchmarks"))
from allocation import ensure_database  # noqa: E402  (benchmarks/allocation.py)

DAY_S = 86_400
RATE_PER_S = 20.0  # the market's job starts a second (issue 10)
MOLT_ADDRESSES = 32_766  # usable hosts of 10.100.128.0/17
SCRATCH_POOL = "bench-address-day"
SCRATCH_CIDR = "10.250.0.0/24"  # outside the plan; 254 usable
# (job_seconds, quarantine_s): the old quarantine, then the new one with jobs of a minute, ten
# minutes, twenty minutes, and an hour (an hour at 20 a second is 72,000 jobs at once: more than
# the /17 holds whatever the quarantine).
SCENARIOS = [(600, 86_400), (60, 120), (600, 120), (1_200, 120), (3_600, 120)]


def main() -> int:
    url = os.environ["DATABASE_URL"]
    if not url.startswith(("postgres://", "postgresql://")):
        print("this benchmark needs PostgreSQL: set DATABASE_URL=postgres://...", file=sys.stderr)
        return 2
    ensure_database(url)

    import django

    django.setup()
    from django.conf import settings

    settings.DEBUG = False  # no query log: its cost is not the allocator's
    from django.core.management import call_command
    from django.db import connection

    from meshnet import allocation, ipplan
    from meshnet.errors import PoolExhausted
    from meshnet.models import IpAllocation, IpPool

    call_command("migrate", verbosity=0)
    size = ipplan.usable_count(ipaddress.IPv4Network(SCRATCH_CIDR))
    scale = MOLT_ADDRESSES / size
    rate = RATE_PER_S / scale
    clock = [datetime(2026, 1, 1, tzinfo=UTC)]
    start = clock[0]
    real_timezone = allocation.timezone
    allocation.timezone = types.SimpleNamespace(now=lambda: clock[0])

    def reset() -> None:
        IpAllocation.objects.filter(pool__name=SCRATCH_POOL).delete()
        IpPool.objects.filter(name=SCRATCH_POOL).delete()

    results = []
    agree = True
    began = time.perf_counter()
    try:
        for job_s, quarantine_s in SCENARIOS:
            reset()
            settings.MOLT_ADDRESS_QUARANTINE_SECONDS = quarantine_s
            ends: list[tuple[float, int, IpAllocation]] = []
            starts = int(DAY_S * rate)
            failed, first_failure, peak_live, calls = 0, None, 0, 0
            for k in range(starts):
                t = k / rate
                while ends and ends[0][0] <= t:
                    end_t, _, lease = heapq.heappop(ends)
                    clock[0] = start + timedelta(seconds=end_t)
                    allocation.release_address(lease)
                    calls += 1
                clock[0] = start + timedelta(seconds=t)
                try:
                    lease = allocation.allocate_address(
                        SCRATCH_POOL, IpAllocation.Purpose.JOB, cidr=SCRATCH_CIDR
                    )
                except PoolExhausted:
                    failed += 1
                    first_failure = t if first_failure is None else first_failure
                else:
                    heapq.heappush(ends, (t + job_s, k, lease))
                    peak_live = max(peak_live, len(ends))
                calls += 1
            needed = RATE_PER_S * (job_s + quarantine_s)
            model_exhausts = needed > MOLT_ADDRESSES
            agree &= model_exhausts == (failed > 0)
            results.append(
                {
                    "job_seconds": job_s,
                    "quarantine_s": quarantine_s,
                    "simulated_starts": starts,
                    "allocator_calls": calls,
                    "refused": failed,
                    "refused_fraction": round(failed / starts, 4),
                    "first_refusal_after_s": None
                    if first_failure is None
                    else round(first_failure),
                    "peak_jobs_at_once_full_scale": round(peak_live * scale),
                    "model_leases_needed_full_scale": round(needed),
                    "model_exhausts": model_exhausts,
                    "holds_the_day": failed == 0,
                }
            )
    finally:
        allocation.timezone = real_timezone
        reset()
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        server_version = cursor.fetchone()[0]
    print(
        json.dumps(
            {
                "benchmark": "address_day",
                "database": f"PostgreSQL {server_version}",
                "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
                "rate_per_s_full_scale": RATE_PER_S,
                "pool_full_scale": MOLT_ADDRESSES,
                "scaled_pool": f"{SCRATCH_CIDR} ({size} addresses, 1/{scale:.1f})",
                "scaled_rate_per_s": round(rate, 4),
                "simulated_seconds": DAY_S,
                "wall_s": round(time.perf_counter() - began, 1),
                "scenarios": results,
                "simulation_agrees_with_model": agree,
            },
            indent=2,
        )
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
