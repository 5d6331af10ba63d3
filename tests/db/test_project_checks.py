"""Project-level checks CI must prove: migrations complete, deploy settings safe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.db]


def _manage(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_models_and_migrations_agree():
    result = _manage("makemigrations", "--check", "--dry-run", env_extra={"DJANGO_DEBUG": "true"})
    assert result.returncode == 0, f"missing migrations:\n{result.stdout}\n{result.stderr}"


def test_production_settings_pass_check_deploy():
    production = {
        "DJANGO_DEBUG": "false",
        "SECRET_KEY": "x" * 20 + "-production-like-secret-key-with-enough-entropy-0123456789",
        "ALLOWED_HOSTS": "molt.example.com",
        "DATABASE_URL": os.environ.get("DATABASE_URL", "sqlite:////tmp/molt-deploy-check.sqlite3"),
    }
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env_extra=production)
    assert result.returncode == 0, f"check --deploy failed:\n{result.stdout}\n{result.stderr}"


def test_production_settings_refuse_to_start_without_secret_key():
    result = _manage("check", env_extra={"DJANGO_DEBUG": "false", "ALLOWED_HOSTS": "x"})
    assert result.returncode != 0
    assert "SECRET_KEY is required" in result.stderr
