"""Celery settings that make a killed worker safe (issue 4): tasks are acknowledged after they
ran, a task whose worker died is redelivered, and nothing is scheduled further ahead than the
broker's visibility timeout (a delayed message not acknowledged by then would be delivered
twice). The behaviour itself is proven with real killed workers in
tests/integration/test_crash_safety.py."""

from __future__ import annotations

import re

import pytest
from django.conf import settings

from config.celery import app
from tests.conftest import REPO

pytestmark = [pytest.mark.unit]


def test_tasks_are_acknowledged_late_and_requeued_when_their_worker_dies():
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_serializer == "json"


def test_every_task_is_late_acknowledged_even_where_it_sets_its_own_options():
    app.loader.import_default_modules()
    ours = [t for name, t in app.tasks.items() if name.startswith(("marketplace.", "meshnet."))]
    assert len(ours) >= 8
    for task in ours:
        assert task.acks_late is True, task.name


def test_no_task_is_delayed_beyond_the_visibility_timeout():
    timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert timeout == settings.CELERY_VISIBILITY_TIMEOUT_SECONDS  # 3600 unless overridden
    # No code schedules a task ahead (eta/countdown); retries back off to at most 10 minutes.
    for path in [*REPO.glob("marketplace/**/*.py"), *REPO.glob("meshnet/**/*.py")]:
        text = path.read_text()
        assert not re.search(r"\b(eta|countdown)\s*=", text), path
    app.loader.import_default_modules()
    for name, task in app.tasks.items():
        if name.startswith(("marketplace.", "meshnet.")) and getattr(task, "retry_backoff", False):
            assert getattr(task, "retry_backoff_max", 600) < timeout, name
