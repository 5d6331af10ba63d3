"""`manage.py audit_ledger`: check every invariant of the ledger (see marketplace.audit).

Prints each violation and exits 1 if there is any; otherwise prints one summary line and exits
0, so it can run from cron or CI and alert on a non-zero exit. Either way the result is kept as
an AuditRun row, which the ops dashboard shows.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from marketplace.audit import record_audit_run


class Command(BaseCommand):
    help = "Audit the ledger against the invariants of money.md; exit 1 on any violation."

    def handle(self, *args, **options) -> None:
        run = record_audit_run(source="command")
        for line in run.violations.splitlines():
            self.stdout.write(f"VIOLATION: {line}")
        if not run.ok:
            raise CommandError(f"ledger audit: {run.violation_count} violation(s)")
        self.stdout.write(
            f"ledger audit: OK ({run.transaction_count} transactions, {run.entry_count} entries)"
        )
