"""The Celery app: Redis broker, JSON only, and settings that make a killed worker safe.

acks_late + reject_on_worker_lost: a task whose worker dies mid-way goes back to the queue and
runs again; every task is idempotent (it re-reads rows and uses compare-and-set), so the effect
lands once.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("molt")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
