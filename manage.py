#!/usr/bin/env python
"""Django's command-line entry point for the MOLT gateway."""

import os
import sys
from pathlib import Path

# `make run`'s settings for a development checkout: with no SECRET_KEY, DJANGO_DEBUG or
# DATABASE_URL in the environment or in .env, the database is the demo's SQLite file and the
# commands the README shows (grant_credits, audit_ledger, seed_demo) must work on it as written.
# Any deployment sets DATABASE_URL (or SECRET_KEY), so it never gets these defaults.
DEVELOPMENT = {"DJANGO_DEBUG": "true", "MOLT_ALLOW_SIMULATED_GPUS": "true"}


def _development_defaults() -> None:
    dotenv = Path(__file__).resolve().parent / ".env"
    if dotenv.is_file():
        from honcho.environ import parse  # the parser `make run` reads .env with

        for key, value in parse(dotenv.read_text()).items():
            os.environ.setdefault(key, value)
    if not {"SECRET_KEY", "DJANGO_DEBUG", "DATABASE_URL"} & os.environ.keys():
        for key, value in DEVELOPMENT.items():
            os.environ.setdefault(key, value)


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    _development_defaults()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
