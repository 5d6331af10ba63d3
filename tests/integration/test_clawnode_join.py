"""`clawnode join` (the installed console script, a real process) against the real gateway.

The gateway runs in pytest-django's live server on the test's PostgreSQL database; the token
comes from the provider through meshnet.enrolment, as the browser page gets it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from clawnode.keys import Identity

from meshnet.enrolment import create_enrollment_token
from meshnet.models import Node, UsedNonce

pytestmark = [
    pytest.mark.integration,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
]

CLAWNODE = Path(sys.executable).parent / "clawnode"
JOINED = re.compile(r"^(node-\d+) joined the mesh at (10\.100\.(?:1[2-9]\d|2[0-5]\d)\.\d{1,3})$")


def clawnode(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLAWNODE_TOKEN"}
    if token is not None:
        env["CLAWNODE_TOKEN"] = token  # the recommended way: keeps the token out of `ps`
    return subprocess.run(
        [str(CLAWNODE), *args], capture_output=True, text=True, env=env, timeout=120
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def gateway_url(live_server, settings):
    settings.MOLT_ALLOW_SIMULATED_GPUS = True
    return live_server.url


def test_join_enrols_the_machine_once_and_a_used_token_is_refused_elsewhere(
    gateway_url, provider, tmp_path
):
    issued = create_enrollment_token(provider)
    state_dir = tmp_path / "machine-1"
    join = (
        "join",
        "--gateway", gateway_url,
        "--state-dir", str(state_dir),
        "--simulated-gpus", "RTX 4090:2,A100 80GB:1",
    )  # fmt: skip

    first = clawnode(*join, token=issued.token)

    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    match = JOINED.match(lines[-1])
    assert match, first.stdout
    name, address = match.groups()
    assert lines[0].startswith("identity: created nd_") and lines[0].endswith(", 0600)")
    assert "GPUs: 2 × RTX 4090, 1 × A100 80GB (simulated)" in lines  # noqa: RUF001
    assert f"enrolling with {gateway_url}…" in lines
    assert issued.token not in first.stdout + first.stderr

    # The gateway has the node, with the simulated GPUs marked as such.
    identity = Identity.load(state_dir / "identity.key")
    node = Node.objects.get(node_id=identity.node_id)
    assert (node.owner, node.name, node.mesh_address) == (provider, name, address)
    assert node.wireguard_public_key == identity.wireguard_public_key_b64
    gpus = list(node.gpus.order_by("index").values_list("name", "memory_mb", "simulated"))
    assert gpus == [
        ("RTX 4090", 24564, True),
        ("RTX 4090", 24564, True),
        ("A100 80GB", 81920, True),
    ]

    # The enrolment keeps the gateway's blocks: the interface prefix (the whole mesh: the hub
    # and every node block on-link), and the job block the agent routes onto its interface
    # (job addresses are not on-link with the node's).
    saved = json.loads((state_dir / "enrollment.json").read_text())
    assert (saved["mesh_network"], saved["job_network"]) == ("10.100.0.0/16", "10.64.0.0/11")

    # Secrets and enrolment are private files.
    assert mode(state_dir / "identity.key") == 0o600
    assert mode(state_dir / "enrollment.json") == 0o600
    assert mode(state_dir) == 0o700

    # Re-running is safe: the same node, no request to the gateway (no nonce used), nothing new.
    nodes, nonces = Node.objects.count(), UsedNonce.objects.count()
    again = clawnode(*join, token=issued.token)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == f"{name} joined the mesh at {address}"
    assert "already enrolled" in again.stdout
    assert (Node.objects.count(), UsedNonce.objects.count()) == (nodes, nonces)

    # Another machine with the now-used token is refused, in one line.
    other = clawnode(*join[:3], "--state-dir", str(tmp_path / "machine-2"), token=issued.token)
    assert other.returncode == 1
    assert other.stderr == (
        "clawnode: error: gateway refused the enrolment (HTTP 403): "
        "enrolment token was already used\n"
    )
    assert Node.objects.count() == nodes


def test_status_after_join_shows_the_node_and_that_no_daemon_runs(gateway_url, provider, tmp_path):
    issued = create_enrollment_token(provider)
    state_dir = tmp_path / "machine"
    joined = clawnode(
        "join", "--gateway", gateway_url, "--state-dir", str(state_dir),
        "--interface", f"mj{os.getpid() % 10000}x", "--simulated-gpus", "L4:1",
        token=issued.token,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    name, address = JOINED.match(joined.stdout.splitlines()[-1]).groups()

    status = clawnode("status", "--state-dir", str(state_dir))

    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[1] == f"node: {name} at {address} (gateway {gateway_url})"
    assert lines[-1] == "gateway: not running"


def test_a_gateway_that_refuses_simulated_gpus_says_so(live_server, settings, provider, tmp_path):
    settings.MOLT_ALLOW_SIMULATED_GPUS = False
    issued = create_enrollment_token(provider)

    result = clawnode(
        "join", "--gateway", live_server.url, "--state-dir", str(tmp_path / "m"),
        "--simulated-gpus", "RTX 4090:1", token=issued.token,
    )  # fmt: skip

    assert result.returncode == 1
    assert "simulated GPUs are not accepted by this gateway" in result.stderr
    assert not Node.objects.exists()


def test_join_with_a_region_takes_an_address_of_its_block_and_a_typo_costs_no_token(
    gateway_url, provider, tmp_path
):
    issued = create_enrollment_token(provider)
    join = (
        "join", "--gateway", gateway_url, "--state-dir", str(tmp_path / "m"),
        "--simulated-gpus", "L4:1",
    )  # fmt: skip

    typo = clawnode(*join, "--region", "eu-wset", token=issued.token)

    assert typo.returncode == 1
    assert typo.stderr.startswith(
        "clawnode: error: gateway refused the enrolment (HTTP 400): unknown region 'eu-wset'; "
        "one of us-west, us-east, eu-west, asia"
    )
    assert not Node.objects.exists()

    joined = clawnode(*join, "--region", "eu-west", token=issued.token)

    assert joined.returncode == 0, joined.stderr
    node = Node.objects.get()
    assert (node.region, node.mesh_address) == ("eu-west", "10.100.48.1")
    assert joined.stdout.splitlines()[-1] == (
        f"{node.name} joined the mesh at 10.100.48.1 (region eu-west)"
    )
