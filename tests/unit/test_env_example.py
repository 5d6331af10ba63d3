"""Every setting config/settings.py reads from the environment is listed in .env.example (issue
12: six were missing, so an operator could not know they existed), and nothing listed there is
a setting the code no longer reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
READ = re.compile(r'env_(?:str|int|bool|list)\(\s*"([A-Z][A-Z0-9_]*)"')
LISTED = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=", re.MULTILINE)
# Read by scripts/run_dev.py (make run), not by config/settings.py.
RUN_DEV_ONLY = {"HOST", "PORT", "CELERY_LOG_LEVEL", "MOLT_DEMO_AGENTS", "MOLT_DEMO_AGENTS_DIR"}


def test_every_setting_the_code_reads_is_in_env_example():
    read = set(READ.findall((ROOT / "config" / "settings.py").read_text()))
    listed = set(LISTED.findall((ROOT / ".env.example").read_text()))

    assert read, "the pattern no longer finds the settings: update this test"
    assert sorted(read - listed) == [], "add these to .env.example with what they do"
    assert sorted(listed - read - RUN_DEV_ONLY) == [], "these are listed but no longer read"
