"""`manage.py audit_ledger`: check every invariant of the ledger (see marketplace.audit).

Prints each violation and exits 1 if there is any; otherwise prints one summary line and exits
0, so it can run from cron or CI and alert on a non-zero exit.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from marketplace.audit import audit_ledger, ledger_counts


class Command(BaseCommand):
    help = "Audit the ledger against the invariants of money.md; exit 1 on any violation."

    def handle(self, *args, **options) -> None:
        violations = audit_ledger()
        for line in violations:
            self.stdout.write(f"VIOLATION: {line}")
        if violations:
            raise CommandError(f"ledger audit: {len(violations)} violation(s)")
        transactions, entries = ledger_counts()
        self.stdout.write(f"ledger audit: OK ({transactions} transactions, {entries} entries)")
