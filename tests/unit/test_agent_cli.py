"""`clawnode` command line (clawnode.cli): arguments, exit codes, the re-run-safe join, status.

Enrolment against the real gateway is in tests/integration/test_clawnode_join.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from clawnode import cli
from clawnode.cli import build_parser, main
from clawnode.gateway_http import EnrollResponse
from clawnode.keys import Identity
from clawnode.state import AgentStatus, Enrollment, StateDir

from tests.ports import unused_port

pytestmark = [pytest.mark.unit]


def closed_port_url() -> str:
    """A gateway URL where nothing listens: any attempt to call it fails loudly."""
    return f"http://127.0.0.1:{unused_port()}"


def enrolled_state(tmp_path, gateway: str, *, interface: str = "h6none0") -> StateDir:
    state = StateDir(tmp_path / "state")
    identity, _ = state.load_or_create_identity()
    state.save_enrollment(
        Enrollment(
            gateway=gateway,
            node_id=identity.node_id,
            name="node-47",
            mesh_address="10.100.128.47",
            gateway_public_key=Identity.generate().public_key_b64,
            websocket_url=gateway.replace("http", "ws", 1) + "/ws/agent/",
            interface=interface,
        )
    )
    return state


# -- arguments ----------------------------------------------------------------------------------


def test_join_arguments_and_their_defaults():
    args = build_parser().parse_args(["join", "--gateway", "https://molt.example", "--token", "t"])

    assert (args.interface, args.listen_port, args.backend) == ("molt0", 51820, "auto")
    assert str(args.state_dir) == "/var/lib/clawnode"
    assert (args.endpoint, args.simulated_gpus, args.force) == ("", "", False)


@pytest.mark.parametrize(
    "argv",
    [
        ["join", "--token", "t"],  # no --gateway
        ["join", "--gateway", "https://g", "--listen-port", "0"],
        ["join", "--gateway", "https://g", "--listen-port", "http"],
        ["join", "--gateway", "https://g", "--backend", "magic"],
        ["run", "--sandbox-engine", "docker-compose"],
        ["run", "--sandbox-engine", "docker", "--docker-host", "tcp://10.0.0.1:2375"],
        ["run", "--image", "-rm -rf"],
        ["run", "--image", "a b"],
        ["fly"],
        [],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)

    assert info.value.code == 2
    assert "usage: clawnode" in capsys.readouterr().err


def test_run_before_join_says_to_join_first_and_creates_nothing(tmp_path, capsys):
    state = tmp_path / "state"
    argv = ["run", "--state-dir", str(state), "--simulated-gpus", "RTX 4090:1"]

    assert main([*argv, "--backend", "userspace"]) == 1
    assert "clawnode join" in capsys.readouterr().out
    assert not state.exists()


def test_run_offers_no_sandboxes_unless_an_engine_is_named():
    args = build_parser().parse_args(["run"])
    assert (args.sandbox_engine, args.images) == ("none", [])

    args = build_parser().parse_args(
        ["run", "--sandbox-engine", "podman", "--image", "docker.io/library/debian:12",
         "--image", "molt/jupyter:2"]
    )  # fmt: skip
    assert args.sandbox_engine == "podman"
    assert args.images == ["docker.io/library/debian:12", "molt/jupyter:2"]

    args = build_parser().parse_args(
        ["run", "--sandbox-engine", "docker", "--docker-host", "unix:///run/docker.sock"]
    )
    assert (args.sandbox_engine, args.docker_host) == ("docker", "unix:///run/docker.sock")


def test_an_agent_without_a_sandbox_engine_has_no_manager(tmp_path):
    from clawnode.gpu import SimulatedGpuReader
    from clawnode.service import sandbox_manager
    from clawnode.state import StateDir

    assert sandbox_manager("none", StateDir(tmp_path), SimulatedGpuReader("RTX 4090:1")) is None
    docker = sandbox_manager(
        "docker", StateDir(tmp_path), SimulatedGpuReader("RTX 4090:1"),
        docker_host="unix:///run/test-docker.sock",
    )  # fmt: skip
    assert type(docker._engine).__name__ == "DockerEngine"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="--sandbox-engine"):
        sandbox_manager("lxc", StateDir(tmp_path), SimulatedGpuReader("RTX 4090:1"))


def test_podman_sandboxes_get_a_user_namespace_unless_host_is_asked(tmp_path, monkeypatch):
    import io

    import clawnode.service
    from clawnode.cli import cmd_run
    from clawnode.gpu import SimulatedGpuReader
    from clawnode.service import sandbox_manager
    from clawnode.state import StateDir

    gpus = SimulatedGpuReader("RTX 4090:1")
    default = sandbox_manager("podman", StateDir(tmp_path), gpus)
    assert default._engine._userns == "auto:size=65536"  # type: ignore[union-attr]
    host = sandbox_manager("podman", StateDir(tmp_path), gpus, userns="")
    assert host._engine._userns == ""  # type: ignore[union-attr]

    seen: dict[str, object] = {}
    monkeypatch.setattr(clawnode.service, "run_daemon", lambda _dir, **kw: seen.update(kw) or 0)
    for argv, passed in (
        ([], None),
        (["--container-userns", "host"], ""),
        (["--container-userns", "auto:size=131072"], "auto:size=131072"),
    ):
        args = build_parser().parse_args(["run", "--sandbox-engine", "podman", *argv])
        assert cmd_run(args, io.StringIO()) == 0
        assert seen["container_userns"] == passed


# -- join: errors before anything is created ----------------------------------------------------


def test_join_without_a_token_says_how_to_give_one_and_creates_nothing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("CLAWNODE_TOKEN", raising=False)
    state_dir = tmp_path / "state"

    rc = main(["join", "--gateway", "https://molt.example", "--state-dir", str(state_dir)])

    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err == (
        "clawnode: error: no enrolment token: pass --token or set CLAWNODE_TOKEN\n"
    )
    assert not state_dir.exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--simulated-gpus", "RTX 4090:lots"], "simulated GPU count"),
        (["--endpoint", "203.0.113.1"], "--endpoint"),
        (["--interface", "this-name-is-too-long"], "interface name"),
    ],
)
def test_join_refuses_bad_input_in_one_line_before_creating_an_identity(
    tmp_path, capsys, extra, words
):
    state_dir = tmp_path / "state"

    rc = main(
        [
            "join",
            "--gateway",
            "https://g.example",
            "--token",
            "t",
            "--state-dir",
            str(state_dir),
            *extra,
        ]
    )

    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("clawnode: error: ") and words in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not state_dir.exists()


def test_an_unreachable_gateway_is_one_line_and_the_token_is_never_printed(tmp_path):
    token = "molt_enr_secret-value-for-this-test"
    gateway = closed_port_url()

    # A real process: what a user sees, exit code included.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clawnode.cli",
            "join",
            "--gateway",
            gateway,
            "--state-dir",
            str(tmp_path / "s"),
            "--simulated-gpus",
            "RTX 4090:2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CLAWNODE_TOKEN": token},
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stdout.splitlines()[1:] == [
        "GPUs: 2 × RTX 4090 (simulated)",  # noqa: RUF001 (the output uses the multiplication sign)
        f"enrolling with {gateway}…",
    ]
    assert result.stdout.startswith("identity: created nd_")
    assert result.stderr == (
        f"clawnode: error: cannot reach gateway {gateway}: connection refused "
        "(is it running on that port?)\n"
    )
    assert token not in result.stdout + result.stderr


# -- join: safe to re-run -----------------------------------------------------------------------


def test_rerunning_join_reports_the_enrolment_without_calling_the_gateway(tmp_path, capsys):
    gateway = closed_port_url()  # a call would fail: connection refused
    state = enrolled_state(tmp_path, gateway, interface="molt0")
    before = state.enrollment_path.read_bytes()

    rc = main(
        [
            "join",
            "--gateway",
            gateway + "/",
            "--token",
            "used-token",
            "--state-dir",
            str(state.path),
        ]
    )

    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[-1] == "node-47 joined the mesh at 10.100.128.47"
    assert out[1].startswith(f"already enrolled with {gateway} as node-47; not contacting")
    assert state.enrollment_path.read_bytes() == before


def test_rerunning_join_notes_options_that_differ_from_the_enrolment(tmp_path, capsys):
    gateway = closed_port_url()
    state = enrolled_state(tmp_path, gateway, interface="molt0")

    rc = main(
        ["join", "--gateway", gateway, "--interface", "molt9", "--state-dir", str(state.path)]
    )

    assert rc == 0
    assert "note: keeping the enrolled --interface molt0" in capsys.readouterr().out


def test_join_with_another_gateway_needs_force(tmp_path, capsys):
    state = enrolled_state(tmp_path, "https://first.example")

    rc = main(
        [
            "join",
            "--gateway",
            "https://second.example",
            "--token",
            "t",
            "--state-dir",
            str(state.path),
        ]
    )

    assert rc == 1
    assert "enrolled with https://first.example as node-47; use --force" in capsys.readouterr().err


def test_join_pins_the_gateway_key_with_its_sequence(tmp_path, capsys, monkeypatch):
    gateway_key = Identity.generate().public_key_b64

    def enroll(gateway, envelope, identity):
        return EnrollResponse(
            node_id=identity.node_id,
            name="node-47",
            mesh_address="10.100.128.47",
            gateway_public_key=gateway_key,
            websocket_url="ws://127.0.0.1:9/ws/agent/",
            gateway_key_sequence=2,  # enrolled after two rotations
        )

    monkeypatch.setattr(cli, "enroll", enroll)
    state_dir = tmp_path / "state"
    rc = main(
        [
            "join",
            "--gateway",
            "http://127.0.0.1:9",
            "--token",
            "t",
            "--simulated-gpus",
            "RTX 4090:1",
            "--state-dir",
            str(state_dir),
        ]
    )

    assert rc == 0, capsys.readouterr()
    saved = StateDir(state_dir).load_enrollment()
    assert saved is not None
    assert (saved.gateway_public_key, saved.gateway_key_sequence) == (gateway_key, 2)
    assert f"gateway key pinned: {gateway_key} (certificate 2)" in capsys.readouterr().out


def test_force_enrols_again(tmp_path, capsys):
    gateway = closed_port_url()
    state = enrolled_state(tmp_path, gateway)

    rc = main(
        ["join", "--gateway", gateway, "--token", "t", "--force", "--state-dir", str(state.path)]
    )

    captured = capsys.readouterr()
    assert rc == 1  # it did call the gateway this time, which is not there
    assert f"enrolling with {gateway}…" in captured.out
    assert "connection refused" in captured.err


def test_an_enrolment_of_another_identity_is_not_reported_as_ours(tmp_path, capsys):
    gateway = closed_port_url()
    state = enrolled_state(tmp_path, gateway)
    Identity.generate().save(state.identity_path)  # the key was replaced behind our back

    rc = main(["join", "--gateway", gateway, "--state-dir", str(state.path)])

    assert rc == 1
    assert "run join --force to enrol this identity" in capsys.readouterr().err


def test_an_identity_file_others_can_read_is_refused(tmp_path, capsys):
    state = enrolled_state(tmp_path, closed_port_url())
    state.identity_path.chmod(0o644)

    rc = main(["status", "--state-dir", str(state.path)])

    assert rc == 1
    assert "chmod 600" in capsys.readouterr().err


# -- status -------------------------------------------------------------------------------------


def test_status_of_a_machine_that_never_joined(tmp_path, capsys):
    rc = main(["status", "--state-dir", str(tmp_path / "nothing")])

    out = capsys.readouterr().out
    assert rc == 1
    assert "identity: none yet" in out
    assert "node: not enrolled" in out


def test_status_of_an_enrolled_machine_whose_daemon_never_ran(tmp_path, capsys):
    state = enrolled_state(tmp_path, "https://molt.example", interface=f"h6s{os.getpid() % 10000}")

    rc = main(["status", "--state-dir", str(state.path)])

    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].startswith("identity: nd_")
    assert out[1] == "node: node-47 at 10.100.128.47 (gateway https://molt.example)"
    assert out[2].startswith("backend: ")
    assert out[3].endswith("is not up (clawnode run brings it up)")
    assert out[4] == "gateway: not running"


def test_status_shows_the_daemons_connection_while_it_runs(tmp_path, capsys):
    state = enrolled_state(tmp_path, "https://molt.example")
    now = int(time.time())
    state.write_status(
        AgentStatus(state="connected", since=now - 600, updated_at=now, pid=os.getpid(), revision=4)
    )

    main(["status", "--state-dir", str(state.path)])

    assert capsys.readouterr().out.splitlines()[-1] == (
        "gateway: connected for 10 min, revision 4 applied"
    )


def test_status_says_not_running_when_the_daemon_is_gone(tmp_path, capsys):
    state = enrolled_state(tmp_path, "https://molt.example")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = int(time.time())
    state.write_status(
        AgentStatus(state="connected", since=now - 900, updated_at=now - 600, pid=gone.pid)
    )

    main(["status", "--state-dir", str(state.path)])

    assert capsys.readouterr().out.splitlines()[-1] == (
        "gateway: not running (last state connected, 10 min ago)"
    )


def test_a_peer_cut_off_and_not_yet_removed_says_so_in_status():
    from clawnode.backends.base import PeerStatus
    from clawnode.cli import _peer_line

    key = "g/HtZfAPruXhYkCEKqPDHMRb/d4UtHdxK/uWnvde9DM="
    live = PeerStatus(key, ("10.100.128.9/32",), rx_bytes=2048, tx_bytes=4096)
    cut = PeerStatus(key, (), rx_bytes=2048, tx_bytes=4096)

    assert "removal pending" not in _peer_line(live, now=1_700_000_000)
    line = _peer_line(cut, now=1_700_000_000)
    assert "allowed -" in line and line.endswith("cut off, removal pending")
    assert "rx 2.0 KiB  tx 4.0 KiB" in line


def test_run_takes_the_simulated_gpus_from_a_file_or_a_spec_not_both(tmp_path, monkeypatch, capsys):
    import clawnode.service

    given = {}
    monkeypatch.setattr(clawnode.service, "run_daemon", lambda state, **kw: given.update(kw) or 0)
    gpus = str(tmp_path / "demo-gpus.json")

    assert main(["run", "--state-dir", str(tmp_path), "--simulated-gpus-file", gpus]) == 0
    assert (given["simulated_gpus_file"], given["simulated_gpus"]) == (gpus, "")
    both = ["--simulated-gpus-file", gpus, "--simulated-gpus", "RTX 4090:1"]
    assert main(["run", "--state-dir", str(tmp_path), *both]) == 1
    assert "give one of them" in capsys.readouterr().err


def _join_seen_at(tmp_path, monkeypatch, seen, holds, *extra) -> dict:
    """`clawnode join` against a gateway that sees the machine at `seen` (None: it cannot
    say), the machine holding that address or not; the enrolment envelope it sent."""
    sent: dict = {}

    def enroll(gateway, envelope, identity):
        sent.update(envelope["body"])
        return EnrollResponse(
            node_id=identity.node_id,
            name="node-47",
            mesh_address="10.100.128.47",
            gateway_public_key=Identity.generate().public_key_b64,
            websocket_url="ws://127.0.0.1:9/ws/agent/",
        )

    monkeypatch.setattr(cli, "enroll", enroll)
    monkeypatch.setattr(cli, "seen_address", lambda gateway: seen)
    monkeypatch.setattr(cli, "holds_address", lambda address: holds)
    rc = main(
        ["join", "--gateway", "http://127.0.0.1:9", "--token", "t", "--simulated-gpus",
         "RTX 4090:1", "--state-dir", str(tmp_path / "state"), *extra]
    )  # fmt: skip
    assert rc == 0
    return sent


def test_a_machine_that_holds_the_address_the_gateway_sees_declares_it_as_its_endpoint(
    tmp_path, monkeypatch, capsys
):
    sent = _join_seen_at(tmp_path, monkeypatch, "203.0.113.5", True, "--listen-port", "51999")
    assert sent["endpoint"] == "203.0.113.5:51999"
    assert "endpoint: 203.0.113.5:51999 (this machine holds" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("seen", "holds", "extra"),
    [
        ("203.0.113.5", False, []),  # seen at an address it does not hold: a NAT in between
        (None, True, []),  # a gateway that cannot say (predates the call, or failed)
        ("192.168.1.5", True, []),  # a private network shared with the gateway
        ("100.64.0.9", True, []),  # carrier-grade NAT's range
        ("127.0.0.1", True, []),  # the gateway on the same machine
        ("203.0.113.5", True, ["--endpoint", "gw.example.net:51820"]),  # declared wins
        ("203.0.113.5", True, ["--endpoint", "none"]),  # asked for no declaration at all
    ],
)
def test_no_endpoint_is_declared_for_a_machine_behind_a_nat_or_on_a_private_network(
    tmp_path, monkeypatch, seen, holds, extra
):
    sent = _join_seen_at(tmp_path, monkeypatch, seen, holds, *extra)
    declared = extra[1] if extra and extra[1] != "none" else ""
    assert sent.get("endpoint", "") == declared


def test_an_address_is_held_when_a_socket_can_bind_it():
    assert cli.holds_address("127.0.0.1")
    assert not cli.holds_address("192.0.2.77")  # documentation range: on no interface here
