"""A pytest plugin that runs mutmut's mutants of a module in one pytest session: the quick
check that docs/testing.md ("payments", 7 December) used when mutmut's own run, a fresh pytest
session and SQLite database per mutant, took over a minute a mutant on the shared machine.

mutmut's trampoline reads MUTANT_UNDER_TEST at every call, so one session can run a test under
one mutant, then under the next. For each mutant named in MUTATE_KEYS (comma-separated mutmut
names) this runs the tests that mutmut's stats pass recorded as calling its function (plus
MUTATE_EXTRA, node ids of tests written after that pass), fastest first, until one fails:
"killed" by that test, else "survived". Then it runs every one of those tests on the original
code and records any failure (then the verdicts mean nothing). Verdicts go to MUTATE_OUT (JSON).

Run it in a copy of a workspace's mutants/ that `scripts/mutate.py MODULE` made (it needs
mutmut's mutated files and its mutmut-stats.json), with the working tree's tests copied over:

    cp -a var/mutate/payments/mutants /tmp/ws && rm -rf /tmp/ws/tests && cp -a tests /tmp/ws/
    cd /tmp/ws && DJANGO_DEBUG=true DJANGO_SETTINGS_MODULE=config.settings \\
      DATABASE_URL=sqlite:////tmp/ws.sqlite3 MOLT_PROPERTY_EXAMPLES=10 \\
      MUTATE_KEYS=marketplace.payments.x_open_dispute__mutmut_1,... MUTATE_OUT=/tmp/out.json \\
      PYTHONPATH=$REPO/scripts $REPO/.venv/bin/python -m pytest -p mutate_inprocess \\
      -p no:cacheprovider -m "(unit or db or property) and not postgres" TEST_FILES...

What it does not do that mutmut does: no time limit (a mutant that loops hangs the session),
and no process of its own per mutant: each test's own fixtures and database rollback are all
that separate one mutant's run from the next (the final run of the original checks that no
mutant left anything behind that makes a test fail). On PostgreSQL that is not enough: one
mutant's failure inside a fixture left every later test of the session failing, the original
included (metering, 7 December). Run it on SQLite, and check a PostgreSQL-only mutant in a
pytest session of its own (MUTANT_UNDER_TEST=<name>).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from _pytest.runner import runtestprotocol

KEYS = [k for k in os.environ.get("MUTATE_KEYS", "").split(",") if k]
OUT = os.environ.get("MUTATE_OUT", "mutate-inprocess.json")
EXTRA = [t for t in os.environ.get("MUTATE_EXTRA", "").split(",") if t]


def _function(key: str) -> str:
    return key.rpartition("__mutmut_")[0]


class _SessionOnly:
    """The `nextitem` a test is torn down towards: everything of the test's own (its module,
    class and function fixtures) is torn down, the session's (the test database) kept.

    Another item as `nextitem` (this plugin's first version took the session's first one)
    kept that item's module set up: when the test just run was of that module, the next test
    of another module failed its setup ("previous item was not torn down properly") before
    running at all, and so "killed" its mutant (allocation, 7 December: 56 false kills, found
    by the final run of the original)."""

    def __init__(self, session) -> None:
        self.session = session

    def listchain(self) -> list:
        return [self.session]


def _failed(session, item, mutant: str) -> bool:
    os.environ["MUTANT_UNDER_TEST"] = mutant
    try:
        reports = runtestprotocol(item, log=False, nextitem=_SessionOnly(session))
    finally:
        os.environ["MUTANT_UNDER_TEST"] = ""
    return any(r.failed for r in reports)


def pytest_runtestloop(session):
    stats = json.loads(Path("mutmut-stats.json").read_text())
    calling = stats["tests_by_mangled_function_name"]
    durations = stats["duration_by_test"]
    by_id = {item.nodeid: item for item in session.items}
    results: dict[str, object] = {}
    used: set[str] = set()
    for key in KEYS:
        tests = [t for t in calling.get(_function(key), []) if t in by_id]
        tests += [t for t in EXTRA if t in by_id and t not in tests]
        tests.sort(key=lambda t: durations.get(t, 0.5))
        used.update(tests)
        killer = next((t for t in tests if _failed(session, by_id[t], key)), None)
        results[key] = {"verdict": "killed" if killer else "survived", "by": killer}
        Path(OUT).write_text(json.dumps(results, indent=1))
    results["original_failures"] = [t for t in sorted(used) if _failed(session, by_id[t], "")]
    Path(OUT).write_text(json.dumps(results, indent=1))
    return True
