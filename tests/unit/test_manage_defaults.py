"""`manage.py` in a development checkout uses `make run`'s settings, so the README's commands
work against the demo database as written (issue 12 item 9); a deployment, which always names
its database or secret, never gets them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.skipif((ROOT / ".env").exists(), reason="a developer's .env would decide it")
def test_with_nothing_set_manage_py_runs_with_the_demo_settings():
    result = manage("check")

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_a_deployment_naming_its_database_still_needs_its_secret(tmp_path):
    result = manage("check", DATABASE_URL=f"sqlite:///{tmp_path}/x.sqlite3")

    assert result.returncode != 0
    assert "SECRET_KEY is required" in result.stderr
