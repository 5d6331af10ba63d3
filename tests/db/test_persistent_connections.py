"""Persistent database connections (issue 14): a process reuses its connection across agent
frames and Celery tasks instead of opening one per unit of work, and a reused connection that
the server dropped is replaced, not handed to the next query."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.db import close_old_connections, connection

from tests.conftest import REPO

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


def _session() -> tuple[int, object]:
    """The DB-API connection the query ran on, and its server session (PG) or object id."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0], connection.connection
        cursor.execute("SELECT 1")
        return id(connection.connection), connection.connection


def test_settings_keep_connections_and_check_their_health():
    env = {**os.environ, "MOLT_DB_CONN_MAX_AGE": "42"}
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings');"
        "django.setup(); from django.conf import settings as s;"
        "d = s.DATABASES['default']; print(d['CONN_MAX_AGE'], d['CONN_HEALTH_CHECKS'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["42", "True"]


# PostgreSQL: Django never closes an in-memory SQLite test database's connection, whatever
# CONN_MAX_AGE says.
@pytest.mark.postgres
@pytest.mark.parametrize("max_age", [300, 0])
def test_database_sync_to_async_reuses_the_connection_only_when_persistent(max_age):
    """Channels calls close_old_connections around every database_sync_to_async call: with a
    CONN_MAX_AGE the next frame runs on the same session, without one on a new one."""
    saved = connection.settings_dict["CONN_MAX_AGE"]
    connection.settings_dict["CONN_MAX_AGE"] = max_age
    connection.close()
    try:

        async def two_frames():
            first = await database_sync_to_async(_session)()
            second = await database_sync_to_async(_session)()
            return first, second

        # Both DB-API connections are held here, so a new one cannot take a freed one's id.
        first, second = async_to_sync(two_frames)()
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = saved
        connection.close()
    assert (first[0] == second[0] and first[1] is second[1]) is (max_age > 0)


@pytest.mark.postgres
def test_a_connection_the_server_dropped_is_replaced_on_reuse():
    assert connection.settings_dict["CONN_MAX_AGE"] > 0
    assert connection.settings_dict["CONN_HEALTH_CHECKS"] is True
    close_old_connections()
    pid, _ = _session()
    close_old_connections()  # end of a unit of work: kept
    import psycopg  # another session kills ours, as a server restart does

    s = connection.settings_dict
    with psycopg.connect(
        dbname=s["NAME"],
        user=s["USER"] or "postgres",
        host=s["HOST"] or "127.0.0.1",
        port=s["PORT"] or 5432,
        autocommit=True,
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    close_old_connections()  # the next unit of work starts
    again, _ = _session()  # the health check found it dead and connected anew
    assert again != pid
