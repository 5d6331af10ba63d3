"""The gateway's services placed in the NAT lab, shared by the nat tier's tests: `manage.py
run_hub` (the hub, 192.0.2.10:51800) and the web gateway (uvicorn, its own redis-server and, for
orders, a Celery worker, at 192.0.2.20) in the lab's services namespace, on the test's database
through PostgreSQL's Unix socket (the lab's namespaces have no route to the machine's loopback,
and a Unix socket crosses network namespaces)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.db import connection

from tests.conftest import REPO
from tests.nat import lab as nat_lab

HUB_PORT = 51800
HUB_ENDPOINT = f"{nat_lab.OBSERVER_A}:{HUB_PORT}"
PG_SOCKET_DIR = "/var/run/postgresql"
# The issue's goal for a provider's address change; discovery itself takes a keepalive (1 s
# here) plus a hub poll (1 s).
DEADLINE_S = 30.0


def database_url_over_unix_socket() -> str:
    s = connection.settings_dict
    if not os.path.exists(f"{PG_SOCKET_DIR}/.s.PGSQL.{s.get('PORT') or 5432}"):
        raise AssertionError(
            f"the hub runs in the lab's services namespace and reaches PostgreSQL through its "
            f"Unix socket, but there is none in {PG_SOCKET_DIR}"
        )
    user = s.get("USER") or "postgres"
    return f"postgres://{user}@{PG_SOCKET_DIR.replace('/', '%2F')}/{s['NAME']}"


class Hub:
    """`manage.py run_hub` in the services namespace, its output in a file."""

    def __init__(self, lab: nat_lab.Lab, settings, log_dir: Path) -> None:
        self.lab = lab
        self.interface = lab.wireguard_name("hub")
        self.log_path = log_dir / "hub.log"
        self.env = {
            **os.environ,
            "DJANGO_DEBUG": "true",
            "DATABASE_URL": database_url_over_unix_socket(),
            "MOLT_STATE_DIR": str(settings.MOLT_STATE_DIR),  # the same gateway key as the test
            "MOLT_HUB_ENDPOINT": HUB_ENDPOINT,
            "MOLT_HUB_PORT": str(HUB_PORT),
            "MOLT_HUB_INTERFACE": self.interface,
            "MOLT_HUB_POLL_SECONDS": "1",
            "MOLT_HUB_RECONCILE_SECONDS": "1",
        }
        log = open(self.log_path, "w")  # noqa: SIM115  (the child holds it)
        self.process = lab.popen(
            lab.services,
            [sys.executable, "manage.py", "run_hub", "--backend", "userspace"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def endpoints(self) -> dict[str, str]:
        """The hub's peers and their endpoints ({} until the hub has brought its interface up)."""
        result = self.lab.exec(
            self.lab.services, "wg", "show", self.interface, "endpoints", check=False
        )
        if result.returncode != 0:
            assert self.process.poll() is None, f"the hub exited:\n{self.log()}"
            return {}
        return dict(line.split("\t") for line in result.stdout.splitlines())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        # The hub leaves its interface up on SIGTERM (a restart adopts it); --down removes it.
        self.lab.exec(
            self.lab.services,
            "env",
            *(
                f"{k}={v}"
                for k, v in self.env.items()
                if k.startswith(("MOLT_", "DJANGO_", "DATABASE_"))
            ),
            sys.executable,
            str(REPO / "manage.py"),
            "run_hub",
            "--backend",
            "userspace",
            "--down",
        )


def wait_for(predicate, seconds: float = DEADLINE_S):
    """predicate()'s first truthy value and the seconds it took, or (None, seconds)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        value = predicate()
        if value:
            return value, time.monotonic() - started
        time.sleep(0.1)
    return None, time.monotonic() - started


GATEWAY_IP = nat_lab.OBSERVER_B  # the gateway's web side; the hub listens on OBSERVER_A
GATEWAY_PORT = 8000
REDIS_PORT = 6390
BIN = Path(sys.executable).parent


class LabGateway:
    """uvicorn and a Redis of its own in the lab's services namespace, on the test's database
    (Unix socket) and gateway key, with the hub configured: agents behind the lab's NATs reach
    it at GATEWAY_IP as they would a public gateway."""

    def __init__(
        self,
        lab: nat_lab.Lab,
        settings,
        log_dir: Path,
        *,
        worker: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.lab, self.log_dir = lab, log_dir
        self.url = f"http://{GATEWAY_IP}:{GATEWAY_PORT}"
        redis_url = f"redis://{GATEWAY_IP}:{REDIS_PORT}/0"
        env = {
            **os.environ,
            "DJANGO_DEBUG": "true",
            "DATABASE_URL": database_url_over_unix_socket(),
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "MOLT_STATE_DIR": str(settings.MOLT_STATE_DIR),
            "MOLT_ALLOW_SIMULATED_GPUS": "true",
            "ALLOWED_HOSTS": GATEWAY_IP,
            "MOLT_HUB_ENDPOINT": HUB_ENDPOINT,
            "MOLT_HUB_KEEPALIVE_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.processes = [
            self._start(
                "redis",
                ["redis-server", "--bind", GATEWAY_IP, "--port", str(REDIS_PORT),
                 "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                env,
            ),
            self._start(
                "web",
                [str(BIN / "uvicorn"), "config.asgi:application", "--host", GATEWAY_IP,
                 "--port", str(GATEWAY_PORT), "--log-level", "warning"],
                env,
            ),
        ]  # fmt: skip
        if worker:
            # Orders are provisioned and settled by Celery tasks (the integration tier's worker).
            self.processes.append(
                self._start(
                    "worker",
                    [str(BIN / "celery"), "-A", "config", "worker", "-l", "info",
                     "--concurrency", "1", "--without-gossip", "--without-mingle",
                     "--hostname", f"nat-{os.getpid()}@%h"],
                    env,
                )
            )  # fmt: skip
        up, _ = wait_for(self._answers, 30)
        assert up, f"the lab's gateway did not answer /healthz/:\n{self.logs()}"

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115  (the child holds it)
        proc = self.lab.popen(
            self.lab.services, args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return proc

    def _answers(self) -> bool:
        probe = f"import urllib.request; urllib.request.urlopen('{self.url}/healthz/', timeout=1)"
        return (
            self.lab.exec(self.lab.services, sys.executable, "-c", probe, check=False).returncode
            == 0
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
