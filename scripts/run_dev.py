"""`make run`: the demo marketplace on this machine, in one command.

1. Environment: `.env` if present (the process environment wins), then development defaults
   (DJANGO_DEBUG=true, MOLT_ALLOW_SIMULATED_GPUS=true, HOST 127.0.0.1, PORT 8000).
2. Redis must answer at REDIS_URL. If nothing listens there and it is this machine, a private
   redis-server is started (no persistence, files in var/) and stopped again on exit.
3. migrate (SQLite at var/molt.sqlite3 unless DATABASE_URL says otherwise), then seed_demo,
   which keeps each demo node's agent identity and enrolment in var/demo-agents/<hostname>/
   (MOLT_DEMO_AGENTS_DIR).
4. The URL and the demo credentials are printed, and honcho runs web (uvicorn), the Celery
   worker, Celery beat and the demo nodes from Procfile.dev, logs interleaved and prefixed:
   - `nodes` (scripts/demo_nodes.py) where the machine allows it (root, /dev/net/tun,
     wireguard-go, nft and ip): a REAL `clawnode run` per demo node, each in a network
     namespace with wireguard-go and nftables, so a buyer's tunnel carries packets;
   - else `agents` (scripts/demo_agents.py): the nine nodes' SIMULATED agents (in-memory
     WireGuard) in one process; the banner says which prerequisite was missing.
   MOLT_DEMO_AGENTS: auto (default, also 1), real (refuse to start without them), simulated,
   or 0 (no demo nodes).
   Ctrl-C (SIGINT) or SIGTERM stops them all; honcho SIGKILLs what is still up after 5 s.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var"
BIN = Path(sys.executable).parent  # the virtualenv's bin: uvicorn, celery, honcho live here
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))  # demo_nodes.py, however this file is loaded
LOCAL_REDIS_HOSTS = {"127.0.0.1", "localhost", "::1"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}  # noqa: S104 (names the wildcard, binds nothing)

DEFAULTS = {
    "DJANGO_SETTINGS_MODULE": "config.settings",
    "DJANGO_DEBUG": "true",
    "MOLT_ALLOW_SIMULATED_GPUS": "true",
    "HOST": "127.0.0.1",
    "PORT": "8000",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "PYTHONUNBUFFERED": "1",
    # Worker and beat print warnings and errors only; `CELERY_LOG_LEVEL=info make run` for all.
    "CELERY_LOG_LEVEL": "warning",
    "MOLT_DEMO_AGENTS": "auto",
    "MOLT_DEMO_AGENTS_DIR": str(VAR / "demo-agents"),
}
FALSE_WORDS = {"0", "false", "no", "off"}
AUTO_WORDS = {"auto", "1", "true", "yes", "on"}
# Why the demo nodes are simulated when they are (for the banner); "" when they are not.
SIMULATED_BECAUSE: list[str] = []


class Abort(Exception):
    """A reason `make run` cannot go on, worded for the person who typed it."""


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def redacted(url: str) -> str:
    """`url` without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def load_environment() -> None:
    dotenv = REPO / ".env"
    if dotenv.exists():
        from honcho.environ import parse  # the parser honcho itself uses for .env

        for key, value in parse(dotenv.read_text()).items():
            os.environ.setdefault(key, value)
        say(f"read {dotenv.name} (variables already in the environment win)")
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        port = int(os.environ["PORT"])
    except ValueError:
        raise Abort(f"PORT={os.environ['PORT']!r} is not a port number") from None
    if not 0 < port < 65536:
        raise Abort(f"PORT={port} is not a port number")
    host = os.environ["HOST"]
    # Django answers only to ALLOWED_HOSTS; a specific bind address is one the user will type.
    if "ALLOWED_HOSTS" not in os.environ and host not in WILDCARD_HOSTS | LOCAL_REDIS_HOSTS:
        bracketed = f"[{host}]" if ":" in host else host
        os.environ["ALLOWED_HOSTS"] = f"127.0.0.1,localhost,[::1],{bracketed}"
    # Tools are found in the virtualenv first, whatever PATH the shell had.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    resolve_demo_agents()
    for tool in ("uvicorn", "celery", "honcho"):
        if shutil.which(tool) is None:
            raise Abort(f"{tool} is not installed in {BIN}; run `make run` (it installs first)")


def resolve_demo_agents() -> None:
    """MOLT_DEMO_AGENTS becomes what runs: "real", "simulated" or "0" (every process started
    sees it: the web pages label simulated agents as such). In real mode the nodes reach the
    gateway at the demo bridge's address, which Django must accept as a host name."""
    import demo_nodes  # scripts/, next to this file

    SIMULATED_BECAUSE.clear()
    asked = os.environ["MOLT_DEMO_AGENTS"].strip().lower()
    if asked in FALSE_WORDS:
        os.environ["MOLT_DEMO_AGENTS"] = "0"
        return
    if asked not in AUTO_WORDS | {"real", "simulated"}:
        raise Abort(
            f"MOLT_DEMO_AGENTS={os.environ['MOLT_DEMO_AGENTS']!r}: say auto, real, simulated or 0"
        )
    if asked == "simulated":
        SIMULATED_BECAUSE.append("MOLT_DEMO_AGENTS=simulated")
    else:
        missing = demo_nodes.missing_prerequisites()
        if missing:
            SIMULATED_BECAUSE.append(f"this machine lacks {', '.join(missing)}")
        elif demo_nodes.gateway_target(local_base_url()) is None:
            SIMULATED_BECAUSE.append(
                f"HOST={os.environ['HOST']} is not an IPv4 address (the nodes' bridge is IPv4)"
            )
        elif demo_nodes.lock_holder_alive():
            SIMULATED_BECAUSE.append("another make run's real demo nodes are up")
        if SIMULATED_BECAUSE and asked == "real":
            raise Abort(f"MOLT_DEMO_AGENTS=real, but {SIMULATED_BECAUSE[0]}")
    if SIMULATED_BECAUSE:
        os.environ["MOLT_DEMO_AGENTS"] = "simulated"
        return
    os.environ["MOLT_DEMO_AGENTS"] = "real"
    from marketplace.demo_network import REAL_NODES_HOST

    hosts = os.environ.get("ALLOWED_HOSTS") or "127.0.0.1,localhost,[::1]"
    if REAL_NODES_HOST not in hosts.split(","):
        os.environ["ALLOWED_HOSTS"] = f"{hosts},{REAL_NODES_HOST}"
    # Where demo_nodes.py points the nodes' DNAT and waits for the gateway (honcho gives each
    # process a PORT of its own, so $PORT there is not the gateway's).
    os.environ["MOLT_DEMO_LOCAL_GATEWAY"] = local_base_url()


def real_demo_nodes() -> bool:
    return os.environ.get("MOLT_DEMO_AGENTS") == "real"


# --- Redis ------------------------------------------------------------------------------------


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def ensure_redis(url: str) -> int | None:
    """Make sure Redis answers at `url`. Returns the pid of a redis-server started here (to be
    stopped on exit), or None when one was already answering."""
    if redis_answers(url):
        say(f"Redis answers at {redacted(url)}")
        return None
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 6379
    if parts.scheme != "redis" or host not in LOCAL_REDIS_HOSTS:
        raise Abort(
            f"Redis does not answer at {redacted(url)}. Start it there, or unset REDIS_URL to "
            "let `make run` start a local redis-server."
        )
    server = shutil.which("redis-server")
    if server is None:
        raise Abort(
            f"Redis does not answer at {redacted(url)} and redis-server is not installed.\n"
            "  Install it (Debian/Ubuntu: sudo apt-get install redis-server) and run `make run` "
            "again,\n  or set REDIS_URL=redis://HOST:PORT/0 to a Redis that is running."
        )
    VAR.mkdir(exist_ok=True)
    pidfile = VAR / "redis.pid"
    pidfile.unlink(missing_ok=True)
    say(f"nothing answers at {redacted(url)}: starting redis-server (log: var/redis.log)")
    subprocess.run(
        [
            server,
            "--port", str(port),
            "--bind", "::1" if host == "::1" else "127.0.0.1",
            # A broker for development: nothing kept on disk, nothing to clean up.
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--dir", str(VAR),
            "--logfile", str(VAR / "redis.log"),
            "--pidfile", str(pidfile),
        ],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_answers(url) and pidfile.exists():
            return int(pidfile.read_text().strip())
        time.sleep(0.1)
    raise Abort(f"redis-server did not answer at {redacted(url)} within 10 s; see var/redis.log")


def stop_redis(pid: int) -> None:
    say(f"stopping the redis-server make run started (pid {pid})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    say(f"redis-server (pid {pid}) is still running after 5 s")


# --- database -----------------------------------------------------------------------------------


def prepare_database() -> str:
    """Migrate and load the demo market; returns what seed_demo printed (the credentials)."""
    import django

    from config.env import ImproperlyConfiguredEnv

    try:
        django.setup()
    except ImproperlyConfiguredEnv as exc:
        raise Abort(f"bad setting: {exc} (see .env.example)") from None
    from django.conf import settings
    from django.core.management import call_command
    from django.db import DatabaseError, connections

    database = settings.DATABASES["default"]
    where = (
        database["NAME"]
        if database["ENGINE"].endswith("sqlite3")
        else redacted(os.environ.get("DATABASE_URL", ""))
    )
    say(f"database: {database['ENGINE'].rsplit('.', 1)[-1]} {where}")
    if database["ENGINE"].endswith("sqlite3"):
        Path(database["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    try:
        call_command("migrate", interactive=False, verbosity=1)
        seeded = io.StringIO()
        if real_demo_nodes():
            from marketplace.demo_network import REAL_NODES_HOST

            # The daemons dial the gateway from their namespaces: the bridge's address, which
            # demo_nodes.py sends on to the gateway's own (DNAT).
            call_command(
                "seed_demo",
                stdout=seeded,
                agents_dir=Path(os.environ["MOLT_DEMO_AGENTS_DIR"]),
                gateway=f"http://{REAL_NODES_HOST}:{os.environ['PORT']}",
                real_nodes=True,
            )
        elif demo_agents():
            # The demo agents' identities and enrolments, kept where demo_agents.py reads them.
            call_command(
                "seed_demo",
                stdout=seeded,
                agents_dir=Path(os.environ["MOLT_DEMO_AGENTS_DIR"]),
                gateway=local_base_url(),
            )
        else:
            call_command("seed_demo", stdout=seeded)
    except DatabaseError as exc:
        raise Abort(f"the database at {where} refused: {exc}\n  (check DATABASE_URL)") from None
    finally:
        connections.close_all()
    return seeded.getvalue()


def remove_demo_leftovers() -> None:
    """What a killed `make run` left of its real demo nodes (namespaces, wireguard-go, nft
    table) goes now, whatever mode this run is in; never while another run's nodes are up."""
    import demo_nodes

    if demo_nodes.missing_prerequisites() or demo_nodes.lock_holder_alive():
        return
    left = demo_nodes.remove_leftovers()
    if left:
        say(f"removed what a killed make run left of its demo nodes: {', '.join(left)}")


# --- processes -----------------------------------------------------------------------------------


def demo_agents() -> bool:
    return os.environ.get("MOLT_DEMO_AGENTS", "1") != "0"


def local_base_url() -> str:
    """The gateway's URL as seen from this machine (a wildcard bind is reached on loopback)."""
    host, port = os.environ["HOST"], os.environ["PORT"]
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"


def banner(seeded: str) -> str:
    host, port = os.environ["HOST"], os.environ["PORT"]
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in shown:
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}"
    lines = [
        "",
        "=" * 72,
        f"  MOLT demo marketplace: {base}/",
        f"  API docs:              {base}/api/docs/",
        f"  OpenAPI schema:        {base}/api/schema/",
        f"  admin:                 {base}/admin/",
    ]
    if host in WILDCARD_HOSTS:
        lines.append(
            f"  listening on all interfaces ({host or '0.0.0.0'}); set ALLOWED_HOSTS to the "  # noqa: S104
            "names you will use"
        )
    lines += ["", *("  " + line for line in seeded.strip().splitlines())]
    if real_demo_nodes():
        lines += [
            "",
            "  demo nodes: REAL clawnode daemons (scripts/demo_nodes.py), one per node in a",
            "  network namespace of its own (ip netns: molt-demo-<hostname>, bridge moltdemo0,",
            "  198.18.0.0/24), with wireguard-go and nftables: an order's WireGuard config brings",
            "  up a tunnel that carries packets. Their GPUs are simulated (none here).",
            "  MOLT_DEMO_AGENTS=simulated runs in-memory agents instead; 0 leaves them out.",
        ]
    elif demo_agents():
        lines += [
            "",
            "  demo nodes: SIMULATED agents (scripts/demo_agents.py) speak the real signed agent",
            "  protocol, so orders reach running; their WireGuard is in memory and moves no",
            "  packets, and their GPUs are simulated. MOLT_DEMO_AGENTS=0 leaves them offline.",
            f"  Not real daemons because {' and '.join(SIMULATED_BECAUSE) or 'asked'}.",
        ]
    started = "web, worker, beat and the demo agents" if demo_agents() else "web, worker and beat"
    lines += ["", f"  {started} start now; Ctrl-C stops them all.", "=" * 72, ""]
    return "\n".join(lines)


def _banner_once_up(text: str) -> None:
    """Print the banner again once the web server answers: the processes' start-up lines have
    pushed the first one off the screen by then."""
    host, port = os.environ["HOST"], os.environ["PORT"]
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/healthz/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        return
    if demo_agents():
        _wait_for_demo_nodes(deadline)
    time.sleep(2.0)  # let the last start-up lines (an agent's first state applied) go first
    print(text.replace(" start now; Ctrl-C", " are up; Ctrl-C", 1), flush=True)


def _wait_for_demo_nodes(deadline: float) -> None:
    """Until every demo node's agent has connected (its node online), or `deadline`: each agent
    prints its start-up lines as it connects, which would push the banner away again."""
    from django.db import DatabaseError, connection

    from meshnet.models import Node

    kept = len(list(Path(os.environ["MOLT_DEMO_AGENTS_DIR"]).glob("*/identity.key")))
    try:
        while time.monotonic() < deadline:
            try:
                if Node.objects.online().count() >= kept:
                    return
            except DatabaseError:
                pass  # a locked SQLite file while the web process writes: ask again
            time.sleep(0.5)
    finally:
        connection.close()


def run_processes(banner_text: str = "") -> int:
    """honcho runs Procfile.dev. It gets its own session, so a terminal's Ctrl-C reaches it once,
    through us; SIGINT and SIGTERM sent to this script (or to `make`) are forwarded."""
    stop_signals: list[int] = []
    children: list[subprocess.Popen] = []

    def forward(signum, _frame) -> None:
        stop_signals.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Handlers first: a Ctrl-C between starting honcho and handling it would orphan honcho.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    demo = ["nodes"] if real_demo_nodes() else ["agents"] if demo_agents() else []
    processes = ["web", "worker", "beat", *demo]
    port = os.environ["PORT"]
    honcho = subprocess.Popen(
        ["honcho", "start", "-f", "Procfile.dev", "-e", os.devnull, "-p", port, *processes],
        cwd=REPO,
        start_new_session=True,
    )
    children.append(honcho)
    if stop_signals:
        honcho.send_signal(stop_signals[0])
    threading.Thread(target=_banner_once_up, args=(banner_text,), daemon=True).start()
    code = honcho.wait()
    stopping = bool(stop_signals)
    # A stop someone asked for is a clean exit; a process that died on its own is not.
    return 0 if stopping else code


def main() -> int:
    os.chdir(REPO)
    redis_pid = None
    try:
        load_environment()
        VAR.mkdir(exist_ok=True)
        remove_demo_leftovers()
        redis_pid = ensure_redis(os.environ["REDIS_URL"])
        seeded = prepare_database()
        text = banner(seeded)
        print(text, flush=True)
        return run_processes(text)
    except Abort as exc:
        print(f"\n[make run] cannot start: {exc}\n", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        say("interrupted before the processes started")
        return 130
    finally:
        if redis_pid is not None:
            stop_redis(redis_pid)


if __name__ == "__main__":
    sys.exit(main())
