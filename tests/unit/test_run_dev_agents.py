"""`make run`'s demo agents switch: MOLT_DEMO_AGENTS=0 (or false/no/off) leaves honcho's `agents`
process out; otherwise it runs with web, worker and beat. (The whole `make run`, agents and all,
is tests/integration/test_make_run.py.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest

from tests.conftest import REPO


@pytest.fixture
def run_dev():
    # load_environment sets defaults (PATH among them) in os.environ: restore it afterwards.
    saved = dict(os.environ)
    spec = importlib.util.spec_from_file_location("run_dev", REPO / "scripts" / "run_dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    os.environ.clear()
    os.environ.update(saved)


def honcho_processes(run_dev, monkeypatch) -> list[str]:
    started = []

    class FakeHoncho:
        def __init__(self, argv, **kwargs):
            started.append(argv)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeHoncho)
    monkeypatch.setattr(run_dev, "_banner_once_up", lambda text: None)
    run_dev.run_processes()
    [argv] = started
    return argv[argv.index("-p") + 2 :]


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_molt_demo_agents_off_leaves_the_agents_out(run_dev, monkeypatch, value):
    monkeypatch.setenv("MOLT_DEMO_AGENTS", value)
    monkeypatch.setenv("PORT", "8000")
    run_dev.load_environment()

    assert honcho_processes(run_dev, monkeypatch) == ["web", "worker", "beat"]
    assert "SIMULATED" not in run_dev.banner("")


def test_the_agents_run_by_default(run_dev, monkeypatch):
    monkeypatch.delenv("MOLT_DEMO_AGENTS", raising=False)
    monkeypatch.setenv("PORT", "8000")
    # A wildcard bind: the agents dial loopback.
    monkeypatch.setenv("HOST", "0.0.0.0")  # noqa: S104
    run_dev.load_environment()

    assert honcho_processes(run_dev, monkeypatch) == ["web", "worker", "beat", "agents"]
    assert "SIMULATED" in run_dev.banner("")
    assert run_dev.local_base_url() == "http://127.0.0.1:8000"


def test_worker_and_beat_are_quiet_unless_asked(run_dev):
    """make run's terminal (issue 12 item 9): worker and beat print warnings and errors, and no
    start-up banner (Celery's -q), so make run's own banner is what stays on the screen."""
    procfile = (REPO / "Procfile.dev").read_text()
    for name in ("worker", "beat"):
        (line,) = [ln for ln in procfile.splitlines() if ln.startswith(f"{name}:")]
        assert f"celery -A config -q {name} " in line and '-l "$CELERY_LOG_LEVEL"' in line
    assert run_dev.DEFAULTS["CELERY_LOG_LEVEL"] == "warning"
