"""`make test`: every tier, on PostgreSQL and then the db tier again on SQLite.

Pass 1 runs the tiers that only compute (unit, db, property) against PostgreSQL
(DATABASE_URL, default the local server) on both cores with pytest-xdist: they are CPU-bound,
and serially they were half of the suite. Pass 2 runs the live tiers (real servers, namespaces,
containers, a VM, faults) against PostgreSQL one test at a time: they share the machine's
network namespaces, nftables and podman, and most of their time is spent waiting, not
computing. Pass 3 runs the db tier against SQLite, the embedded default of `make run`, so both
backends are proven, again on both cores. Each tier whose prerequisites are missing is skipped
with its reason; under CI=true a skip fails the run (see tests/conftest.py). pytest's exit 5
(no tests ran) is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/molt")


def pytest(label: str, env_extra: dict[str, str], args: list[str]) -> int:
    env = {**os.environ, "DJANGO_DEBUG": "true", "PYTHONUNBUFFERED": "1", **env_extra}
    print(f"\n=== {label} ===", flush=True)
    code = subprocess.call([sys.executable, "-m", "pytest", *args], cwd=REPO, env=env)
    if code == 5:
        print(f"{label}: pytest collected no tests; that is a failure", flush=True)
        return 1
    return code


LIVE_TIERS = "integration or netns or browser or vm or sandbox or nat or mesh or faults"
# Two workers: the machine the suite is held to (45 minutes) has two cores.
WORKERS = os.environ.get("MOLT_TEST_WORKERS", "2")
# The test database is thrown away: a commit need not wait for the WAL to reach the disk. Every
# PostgreSQL connection of the run (pytest's, and the gateways and workers it starts) reads
# PGOPTIONS through libpq.
POSTGRES_ENV = {"DATABASE_URL": POSTGRES_URL, "PGOPTIONS": "-c synchronous_commit=off"}


def main() -> int:
    extra = sys.argv[1:]
    # The slowest tests are printed with each pass's result, so a CI log shows where the
    # suite's time goes (the suite is held to 45 minutes on a 2-core machine).
    durations = ["--durations=15", "--durations-min=15"]
    with tempfile.TemporaryDirectory(prefix="molt-sqlite-") as tmp:
        codes = [
            pytest(
                "unit, db and property tiers on PostgreSQL",
                POSTGRES_ENV,
                ["-m", f"not ({LIVE_TIERS})", "-n", WORKERS, *durations, *extra],
            ),
            pytest(
                "live tiers on PostgreSQL",
                POSTGRES_ENV,
                ["-m", LIVE_TIERS, *durations, *extra],
            ),
            pytest(
                "db tier on SQLite",
                {
                    # Each xdist worker gets a database file of its own (pytest-django).
                    "DATABASE_URL": f"sqlite:///{tmp}/molt.sqlite3",
                    # The ledger's state machine runs its full 200 examples on PostgreSQL, the
                    # production database, in pass 1; here it proves the embedded backend with
                    # fewer (it was a third of this pass).
                    "MOLT_PROPERTY_EXAMPLES": os.environ.get("MOLT_PROPERTY_EXAMPLES", "50"),
                },
                ["-m", "db and not postgres", "-n", WORKERS, *durations, *extra],
            ),
        ]
    failed = [c for c in codes if c != 0]
    print("\nmake test:", "FAILED" if failed else "passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
