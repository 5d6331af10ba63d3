"""`make run`'s demo agents switch: MOLT_DEMO_AGENTS=0 (or false/no/off) leaves the demo nodes
out; auto (the default) runs honcho's `nodes` (real daemons, scripts/demo_nodes.py) where the
machine allows it, else `agents` (simulated) with the banner saying what was missing; simulated
forces the simulated agents, real refuses to start without the real daemons. (The whole
`make run`: tests/integration/test_make_run.py simulated, tests/browser/test_make_run_first_order.py
real.)"""

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
def test_molt_demo_agents_off_leaves_the_agents_out(run_dev, machine, monkeypatch, value):
    monkeypatch.setenv("MOLT_DEMO_AGENTS", value)
    monkeypatch.setenv("PORT", "8000")
    run_dev.load_environment()

    assert honcho_processes(run_dev, monkeypatch) == ["web", "worker", "beat"]
    assert "SIMULATED" not in run_dev.banner("") and "REAL" not in run_dev.banner("")


@pytest.fixture
def machine(run_dev, monkeypatch):
    """What demo_nodes.py finds on this machine, set by the test: missing prerequisites, and
    whether another make run's real nodes hold the lock."""
    import demo_nodes  # run_dev put scripts/ on sys.path

    found = {"missing": [], "locked": False}
    monkeypatch.setattr(demo_nodes, "missing_prerequisites", lambda: list(found["missing"]))
    monkeypatch.setattr(demo_nodes, "lock_holder_alive", lambda: found["locked"])
    monkeypatch.delenv("MOLT_DEMO_AGENTS", raising=False)
    monkeypatch.delenv("ALLOWED_HOSTS", raising=False)
    monkeypatch.setenv("PORT", "8000")
    monkeypatch.setenv("HOST", "127.0.0.1")
    return found


def test_simulated_agents_by_default_where_the_machine_cannot_run_real_ones(run_dev, machine):
    machine["missing"] = ["root (network namespaces and nftables need it)", "nft on PATH"]
    run_dev.load_environment()

    assert os.environ["MOLT_DEMO_AGENTS"] == "simulated"
    banner = run_dev.banner("")
    assert "SIMULATED" in banner and "REAL" not in banner
    assert "this machine lacks root (network namespaces and nftables need it), nft" in banner


def test_the_agents_run_by_default_and_dial_loopback_on_a_wildcard_bind(
    run_dev, machine, monkeypatch
):
    machine["missing"] = ["/dev/net/tun (wireguard-go's TUN device)"]
    monkeypatch.setenv("HOST", "0.0.0.0")  # noqa: S104
    run_dev.load_environment()

    assert honcho_processes(run_dev, monkeypatch) == ["web", "worker", "beat", "agents"]
    assert run_dev.local_base_url() == "http://127.0.0.1:8000"


def test_real_nodes_by_default_where_the_machine_allows(run_dev, machine, monkeypatch):
    run_dev.load_environment()

    assert honcho_processes(run_dev, monkeypatch) == ["web", "worker", "beat", "nodes"]
    assert os.environ["MOLT_DEMO_AGENTS"] == "real"
    banner = run_dev.banner("")
    assert "REAL clawnode daemons" in banner and "SIMULATED" not in banner
    # The daemons reach the gateway at the bridge's address: Django must answer to it.
    assert os.environ["ALLOWED_HOSTS"].split(",")[-1] == "198.18.0.1"
    assert os.environ["MOLT_DEMO_LOCAL_GATEWAY"] == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("setup", "because"),
    [
        ({"MOLT_DEMO_AGENTS": "simulated"}, "MOLT_DEMO_AGENTS=simulated"),
        ({"HOST": "::1"}, "HOST=::1 is not an IPv4 address"),
        ({"HOST": "localhost"}, "HOST=localhost is not an IPv4 address"),
        ({"locked": True}, "another make run's real demo nodes are up"),
    ],
)
def test_simulated_agents_when_asked_or_when_real_ones_cannot_start_here(
    run_dev, machine, monkeypatch, setup, because
):
    machine["locked"] = setup.pop("locked", False)
    for key, value in setup.items():
        monkeypatch.setenv(key, value)
    run_dev.load_environment()

    assert honcho_processes(run_dev, monkeypatch) == ["web", "worker", "beat", "agents"]
    assert f"Not real daemons because {because}" in run_dev.banner("")


def test_molt_demo_agents_real_refuses_to_fall_back(run_dev, machine, monkeypatch):
    machine["missing"] = ["wireguard-go on PATH"]
    monkeypatch.setenv("MOLT_DEMO_AGENTS", "real")
    with pytest.raises(run_dev.Abort, match="MOLT_DEMO_AGENTS=real, but this machine lacks "
                       "wireguard-go on PATH"):  # fmt: skip
        run_dev.load_environment()


def test_a_bad_molt_demo_agents_is_refused_by_name(run_dev, machine, monkeypatch):
    monkeypatch.setenv("MOLT_DEMO_AGENTS", "maybe")
    with pytest.raises(run_dev.Abort, match="MOLT_DEMO_AGENTS='maybe': say auto, real"):
        run_dev.load_environment()


def test_worker_and_beat_are_quiet_unless_asked(run_dev):
    """make run's terminal (issue 12 item 9): worker and beat print warnings and errors, and no
    start-up banner (Celery's -q), so make run's own banner is what stays on the screen."""
    procfile = (REPO / "Procfile.dev").read_text()
    for name in ("worker", "beat"):
        (line,) = [ln for ln in procfile.splitlines() if ln.startswith(f"{name}:")]
        assert f"celery -A config -q {name} " in line and '-l "$CELERY_LOG_LEVEL"' in line
    assert run_dev.DEFAULTS["CELERY_LOG_LEVEL"] == "warning"
