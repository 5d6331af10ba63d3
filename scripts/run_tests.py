"""`make test`: every tier, on PostgreSQL and then the db tier again on SQLite.

Pass 1 runs the whole suite against PostgreSQL (DATABASE_URL, default the local server).
Pass 2 runs the db tier against SQLite, the embedded default of `make run`, so both backends
are proven. Each tier whose prerequisites are missing is skipped with its reason; under CI=true
a skip fails the run (see tests/conftest.py). pytest's exit 5 (no tests ran) is a failure.
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


def main() -> int:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="molt-sqlite-") as tmp:
        codes = [
            # The slowest tests are printed with the result, so a CI log shows where the
            # suite's time goes (the suite is held to 45 minutes on a 2-core machine).
            pytest(
                "all tiers on PostgreSQL",
                {"DATABASE_URL": POSTGRES_URL},
                ["--durations=30", "--durations-min=15", *extra],
            ),
            pytest(
                "db tier on SQLite",
                {
                    "DATABASE_URL": f"sqlite:///{tmp}/molt.sqlite3",
                    # The ledger's state machine runs its full 200 examples on PostgreSQL, the
                    # production database, in pass 1; here it proves the embedded backend with
                    # fewer (it was a third of this pass).
                    "MOLT_PROPERTY_EXAMPLES": os.environ.get("MOLT_PROPERTY_EXAMPLES", "50"),
                },
                ["-m", "db and not postgres", "--durations=10", "--durations-min=15", *extra],
            ),
        ]
    failed = [c for c in codes if c != 0]
    print("\nmake test:", "FAILED" if failed else "passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
