"""PostgreSQL backends terminated under a working gateway (an operator's pg_terminate_backend, a
failover, a proxy dropping idle sessions): first every persistent connection of web, worker and
the agents' consumer at once, then again and again while buyers order and stop. Only this
test database's backends are terminated (the server is shared); the test's own survives.

A write cut by the termination rolls back and answers 503 `unavailable` (retry), never the
500 of a bug (what it answered before this tier); one that committed answers 2xx, also when the
termination landed in its COMMIT (ambiguous to the client: the gateway asks the server, on a new
connection, what became of the transaction; marketplace.lost_commits); one that found its
persistent connection dead before it started does not fail at all: the health check replaces
the connection. A client retrying a 503 with its Idempotency-Key is answered each time, never
409 for a claim the dead connection left in flight."""

from __future__ import annotations

import random
import threading

import pytest

from marketplace.models import Order
from tests.factories import wg_public_key
from tests.faults.conftest import (
    assert_recovered,
    backend_pid,
    fault_market,
    pg_terminate_test_backends,
    run_sweeps,
)
from tests.integration.conftest import wait_until
from tests.integration.test_agent_daemon import RunningAgent

pytestmark = [pytest.mark.faults, pytest.mark.postgres]


def test_postgres_backends_terminated_mid_flow(fault_gateway, buyer, provider, tmp_path):
    gateway = fault_gateway(MOLT_PENDING_SWEEP_AFTER_SECONDS="1")
    provider_node, listing, client = fault_market(gateway, provider, buyer, tmp_path)

    with RunningAgent(provider_node.agent):
        status, first = client.order(listing.pk, wg_public_key())
        assert status == 201, first
        wait_until(
            lambda: Order.objects.filter(pk=first["id"], state="running").exists(),
            timeout=30,
            message="the first order to run",
        )

        # Every idle persistent connection dies at once: the next request of each process
        # must notice before using it.
        assert pg_terminate_test_backends() > 0
        status, stopped = client.request("POST", f"/api/v1/orders/{first['id']}/stop/")
        assert status == 200 and stopped["state"] == "stopping", stopped
        status, second = client.order(listing.pk, wg_public_key())
        assert status == 201, second

        # Then a storm: backends terminated at random intervals (20-400 ms) while orders are
        # placed and stopped, so that terminations land at every point of a request (before
        # its transaction, inside it, in its COMMIT, after it) and some requests get through.
        storm_over = threading.Event()
        spare = (backend_pid(),)  # this test's own connection reads the outcome
        seed = random.randrange(2**32)
        print(f"storm seed {seed}")
        pace = random.Random(seed)

        def storm() -> None:
            from django.db import connection

            try:
                while not storm_over.wait(pace.uniform(0.02, 0.4)):
                    pg_terminate_test_backends(spare)
            finally:
                connection.close()

        keys: dict[str, int] = {}
        stops: dict[int, int] = {}
        retried = 0

        def until_answered(idempotency_key: str, path: str, body: dict | None = None):
            """POST, a 503 retried with the same Idempotency-Key, as its detail says: each
            retry is answered (the write committed, or done now), never 409 for a claim that a
            dead connection left in flight."""
            nonlocal retried
            for _ in range(20):
                status, answer = client.request(
                    "POST", path, body, **{"Idempotency-Key": idempotency_key}
                )
                if status != 503:
                    break
                retried += 1
            return status, answer

        thread = threading.Thread(target=storm, daemon=True)
        thread.start()
        try:
            for i in range(16):
                key = wg_public_key()
                # Odd orders carry an Idempotency-Key and are retried; even ones are sent once.
                if i % 2:
                    order = {
                        "listing": listing.pk,
                        "gpu_count": 1,
                        "hours": 1,
                        "wireguard_public_key": key,
                    }
                    status, body = until_answered(f"storm-order-{i}", "/api/v1/orders/", order)
                else:
                    status, body = client.order(listing.pk, key)
                keys[key] = status
                if status == 201:
                    # Stopped at once, retried, so that the listing's 4 GPUs stay free.
                    stops[body["id"]], _ = until_answered(
                        f"storm-stop-{i}", f"/api/v1/orders/{body['id']}/stop/"
                    )
        finally:
            storm_over.set()
            thread.join()
        # A write cut by the storm is refused with a 503 (nothing of it committed); one that
        # committed answered 2xx, even when the termination landed in its COMMIT.
        for key, status in keys.items():
            committed = Order.objects.filter(wireguard_public_key=key).count()
            assert committed == (1 if status == 201 else 0), (key, status, client.writes)
        for order_id, status in stops.items():
            stopped = Order.objects.get(pk=order_id).state in ("cancelled", "stopping", "completed")
            assert stopped == (status == 200), (order_id, status, client.writes)
        refused = [w for w in client.writes if w[2] >= 500]
        assert all(w[2] == 503 and '"unavailable"' in w[3] for w in refused), refused
        in_flight = [w for w in client.writes if "idempotency_key_in_flight" in w[3]]
        assert in_flight == [], in_flight
        client.writes = [w for w in client.writes if w[2] < 500]
        print(
            f"storm: {len(keys)} orders ({sum(s == 201 for s in keys.values())} placed), "
            f"{len(stops)} stops ({sum(s == 200 for s in stops.values())} done), "
            f"{len(refused)} refused, {retried} retried with the key"
        )

        run_sweeps(gateway)
        wait_until(
            lambda: Order.objects.filter(pk=second["id"], state="running").exists(),
            timeout=30,
            message=f"the second order to run\n{gateway.logs()}",
        )
        wait_until(
            lambda: not Order.objects.filter(state__in=("pending", "provisioning", "stopping")),
            timeout=30,
            message=f"every order to leave its transitional state\n{gateway.logs()}",
        )
        assert_recovered(gateway, [client], [provider_node])
