"""install.sh refuses a plain-http gateway off this machine unless told --insecure: the script
would pipe into `sudo sh` and then pin whatever key answers the join (issue 15 item 5)."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = [pytest.mark.db, pytest.mark.django_db]


def _run(script, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "install.sh"
    path.write_bytes(script)
    return subprocess.run(
        ["sh", str(path), "--token", "t", "--skip-apt", "--no-systemd", "--prefix",
         str(tmp_path / "p"), *args],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_a_plain_http_gateway_elsewhere_is_refused_before_anything_runs(client, tmp_path):
    script = client.get("/install.sh").content

    result = _run(script, tmp_path, "--gateway", "http://192.0.2.7:8000")

    assert result.returncode != 0
    assert "is plain http" in result.stderr and "--insecure" in result.stderr
    assert "[1/6]" not in result.stdout  # refused while reading the options
    assert not (tmp_path / "p").exists()


def test_with_insecure_the_script_goes_on_to_its_first_step(client, tmp_path):
    script = client.get("/install.sh").content

    result = _run(script, tmp_path, "--gateway", "http://192.0.2.7:8000", "--insecure")

    assert "is plain http" not in result.stderr
    assert "[1/6]" in result.stdout or "as root" in result.stderr
