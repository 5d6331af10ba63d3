"""Django project wiring: settings, URLs, ASGI, Celery. Nothing imports this but entry points."""

from .celery import app as celery_app

__all__ = ["celery_app"]
