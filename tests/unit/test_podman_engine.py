"""PodmanEngine's command line, against a stand-in podman that records its argv (the real one
runs in the sandbox tier, tests/sandbox/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clawnode.sandbox.engine import ContainerSpec, EngineError
from clawnode.sandbox.podman import SANDBOX_CAPABILITIES, PodmanEngine

pytestmark = pytest.mark.unit


def fake_podman(tmp_path: Path, run_stderr: str = "", run_code: int = 0) -> Path:
    """A podman that appends each argv (JSON) to calls.jsonl; `run` answers as told, `inspect`
    says PID 0 (not running), everything else succeeds with no output."""
    script = tmp_path / "podman"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'run' in sys.argv:\n"
        f"    sys.stderr.write({run_stderr!r})\n"
        f"    sys.exit({run_code})\n"
        "if 'inspect' in sys.argv:\n"
        "    print('0')\n"
    )
    script.chmod(0o755)
    return script


def calls(tmp_path: Path) -> list[list[str]]:
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


SPEC = ContainerSpec(
    name="molt-order-1",
    ref="order:1",
    image="debian:12",
    netns="/var/run/netns/molt-order-1",
    cdi_devices=("nvidia.com/gpu=0",),
    cpus_milli=1000,
    memory_mb=256,
    pids_limit=64,
    disk_gb=1,
    mounts={"/var/lib/clawnode/molt-order-1/ssh": "/etc/molt"},
    dns=("169.254.0.1",),
    dns_search=("molt",),
)


def test_each_sandbox_gets_a_user_namespace_podmans_named_capabilities_and_its_own_resolv(
    tmp_path: Path,
) -> None:
    engine = PodmanEngine(podman=str(fake_podman(tmp_path)), workdir=tmp_path)

    # The stand-in's inspect says the container is not running: the network join cannot go on.
    with pytest.raises(EngineError):
        engine.start(SPEC)

    run = next(argv for argv in calls(tmp_path) if argv[0] == "run")
    assert run[run.index("--userns") + 1] == "auto:size=65536"
    # Its own network namespace (owned by its user namespace); the veth is moved in after.
    assert run[run.index("--network") + 1] == "none"
    assert "--dns" not in run
    assert run[run.index("--cap-drop") + 1] == "all"
    added = [run[i + 1] for i, arg in enumerate(run) if arg == "--cap-add"]
    assert added == list(SANDBOX_CAPABILITIES)
    # Podman's default set, named; never one that reaches past the user namespace's own files.
    assert {"CHOWN", "NET_BIND_SERVICE", "SETGID", "SETUID", "SYS_CHROOT"} <= set(added)
    assert not {"SYS_ADMIN", "NET_ADMIN", "NET_RAW", "MKNOD", "SYS_MODULE"} & set(added)
    mounts = [run[i + 1] for i, arg in enumerate(run) if arg == "--mount"]
    assert (
        "type=bind,source=/var/lib/clawnode/molt-order-1/ssh,destination=/etc/molt,ro=true,U=true"
        in mounts
    )
    resolv = tmp_path / "resolv" / "molt-order-1.conf"
    assert f"type=bind,source={resolv},destination=/etc/resolv.conf,ro=true" in mounts
    # The failed start removed the container, and its resolv.conf with it.
    assert ["rm", "-f", "-v", "--ignore", "--time", "2", "molt-order-1"] in calls(tmp_path)
    assert not resolv.exists()


def test_host_userns_joins_the_named_namespace_as_before(tmp_path: Path) -> None:
    engine = PodmanEngine(podman=str(fake_podman(tmp_path)), workdir=tmp_path, userns="")

    with pytest.raises(EngineError):  # the stand-in lists no containers afterwards
        engine.start(SPEC)

    run = next(argv for argv in calls(tmp_path) if argv[0] == "run")
    assert "--userns" not in run
    assert run[run.index("--network") + 1] == "ns:/var/run/netns/molt-order-1"
    assert run[run.index("--dns") + 1] == "169.254.0.1"
    assert not any(arg.endswith(",U=true") for arg in run)


def test_a_missing_subuid_entry_is_named_as_the_providers_to_fix(tmp_path: Path) -> None:
    podman = fake_podman(
        tmp_path,
        run_stderr='Error: cannot find mappings for user "containers": No subuid ranges found '
        'for user "containers" in /etc/subuid\n',
        run_code=125,
    )
    engine = PodmanEngine(podman=str(podman), workdir=tmp_path)

    with pytest.raises(EngineError) as raised:
        engine.start(SPEC)

    assert "No subuid ranges found" in str(raised.value)
    assert "need a 'containers' entry" in str(raised.value)


def flaky_rm_podman(tmp_path: Path, failures: int, stderr: str) -> Path:
    """A podman whose first `failures` `rm` calls fail with `stderr`; every call is counted."""
    script = tmp_path / "podman"
    count = tmp_path / "rm-count"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import pathlib, sys\n"
        "if 'rm' in sys.argv:\n"
        f"    count = pathlib.Path({str(count)!r})\n"
        "    n = int(count.read_text()) if count.exists() else 0\n"
        "    count.write_text(str(n + 1))\n"
        f"    if n < {failures}:\n"
        f"        sys.stderr.write({stderr!r})\n"
        "        sys.exit(125)\n"
    )
    script.chmod(0o755)
    return script


BUSY = (
    "Error: removing container 8bd2117158 root filesystem: 1 error occurred:\n"
    "\t* unlinkat /var/lib/containers/storage/overlay/ab12/merged: device or resource busy\n"
)


def test_a_busy_root_filesystem_on_remove_is_retried(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("clawnode.sandbox.podman._REMOVE_RETRY_SECONDS", 0)
    engine = PodmanEngine(podman=str(flaky_rm_podman(tmp_path, 2, BUSY)), workdir=tmp_path)
    engine.remove("molt-order-1")
    assert (tmp_path / "rm-count").read_text() == "3"


def test_a_remove_that_stays_busy_names_the_cause(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("clawnode.sandbox.podman._REMOVE_RETRY_SECONDS", 0)
    engine = PodmanEngine(podman=str(flaky_rm_podman(tmp_path, 99, BUSY)), workdir=tmp_path)
    with pytest.raises(EngineError) as raised:
        engine.remove("molt-order-1")
    assert "device or resource busy" in str(raised.value)
    assert (tmp_path / "rm-count").read_text() == "4"


def test_any_other_remove_error_is_not_retried(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("clawnode.sandbox.podman._REMOVE_RETRY_SECONDS", 0)
    engine = PodmanEngine(
        podman=str(flaky_rm_podman(tmp_path, 99, "Error: permission denied\n")), workdir=tmp_path
    )
    with pytest.raises(EngineError, match="permission denied"):
        engine.remove("molt-order-1")
    assert (tmp_path / "rm-count").read_text() == "1"
