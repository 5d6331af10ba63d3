"""PodmanEngine's command line, against a stand-in podman that records its argv (the real one
runs in the sandbox tier, tests/sandbox/)."""

from __future__ import annotations

import dataclasses
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


def _run_argv(tmp_path: Path, spec: ContainerSpec, *, quota: bool = True, **engine) -> list[str]:
    """The `podman run` argv of one start (the stand-in then fails the start: not running)."""
    from clawnode.sandbox.quota import DiskQuota

    tmp_path.mkdir(exist_ok=True)
    podman = PodmanEngine(
        podman=str(fake_podman(tmp_path)), workdir=tmp_path, ulimits={"nofile": 4096}, **engine
    )
    podman._quota = DiskQuota(quota, "as the test says")  # podman info, asked once, answered
    with pytest.raises(EngineError):
        podman.start(spec)
    return next(argv for argv in calls(tmp_path) if argv[0] == "run")


JOB = dataclasses.replace(
    SPEC,
    cdi_devices=("nvidia.com/gpu=1", "nvidia.com/gpu=3"),
    cpus_milli=2500,
    env={"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"},
    labels={"molt.order": "1"},
    command=("/usr/sbin/sshd", "-D"),
)
CAPS = [arg for cap in SANDBOX_CAPABILITIES for arg in ("--cap-add", cap)]
LIMITS = [
    *("--device", "nvidia.com/gpu=1", "--device", "nvidia.com/gpu=3"),
    *("--cpus", "2.500", "--memory", "256m", "--memory-swap", "256m", "--pids-limit", "64"),
]
NAMED = ["run", "-d", "--name", "molt-order-1", "--hostname", "molt-order-1"]
LABELS = ["--label", "molt.order=1", "--label", "molt.managed=1", "--label", "molt.ref=order:1"]
TAIL = ["--env", "NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b", "debian:12", "/usr/sbin/sshd", "-D"]


def test_the_run_command_gives_exactly_the_jobs_gpus_and_the_limits_it_paid_for(tmp_path):
    """Every argument of a user-namespaced sandbox's `podman run`: its GPUs as CDI devices and
    no others, CPU, memory with no swap on top, pids, the disk where the store enforces it."""
    resolv = tmp_path / "resolv" / "molt-order-1.conf"
    assert _run_argv(tmp_path, JOB) == [
        *NAMED,
        *LABELS,
        *("--userns", "auto:size=65536", "--network", "none"),
        *("--mount", f"type=bind,source={resolv},destination=/etc/resolv.conf,ro=true"),
        *("--cap-drop", "all", *CAPS),
        *LIMITS,
        *("--storage-opt", "size=1G", "--ulimit", "nofile=4096:4096"),
        "--mount",
        "type=bind,source=/var/lib/clawnode/molt-order-1/ssh,destination=/etc/molt,ro=true,U=true",
        *TAIL,
    ]


def test_in_the_hosts_user_namespace_the_run_command_joins_the_sandboxes_network_namespace(
    tmp_path,
):
    """userns "" (and Podman's default capabilities): the named netns and the agent's resolver
    as podman flags, the mount not chowned; the same GPUs and limits."""
    assert _run_argv(tmp_path, JOB, userns="", capabilities=None) == [
        *NAMED,
        *LABELS,
        *("--network", "ns:/var/run/netns/molt-order-1"),
        *("--dns", "169.254.0.1", "--dns-search", "molt"),
        *LIMITS,
        *("--storage-opt", "size=1G", "--ulimit", "nofile=4096:4096"),
        "--mount",
        "type=bind,source=/var/lib/clawnode/molt-order-1/ssh,destination=/etc/molt,ro=true",
        *TAIL,
    ]


def test_no_storage_opt_without_a_disk_or_on_a_store_that_does_not_enforce_it(tmp_path):
    no_disk = _run_argv(tmp_path / "a", dataclasses.replace(JOB, disk_gb=0))
    unenforced = _run_argv(tmp_path / "b", JOB, quota=False)
    assert "--storage-opt" not in no_disk and "--storage-opt" not in unenforced


def test_a_resolver_alone_still_gets_its_resolv_conf_in_a_user_namespace(tmp_path):
    for name, spec in {
        "servers": dataclasses.replace(JOB, dns_search=()),
        "search": dataclasses.replace(JOB, dns=()),
        "neither": dataclasses.replace(JOB, dns=(), dns_search=()),
    }.items():
        run = _run_argv(tmp_path / name, spec)
        mounts = [run[i + 1] for i, arg in enumerate(run) if arg == "--mount"]
        has_resolv = any("destination=/etc/resolv.conf" in mount for mount in mounts)
        assert has_resolv == (name != "neither"), name


def test_a_user_namespaced_sandbox_moves_its_network_into_the_started_containers_namespace(
    tmp_path, monkeypatch
):
    """The veth made for this sandbox (spec.netns) goes to this container's process, by the PID
    podman reports for it."""
    from clawnode.sandbox import podman as podman_module

    script = fake_podman(tmp_path)
    script.write_text(script.read_text().replace("print('0')", "print('4242')"))
    joined = []
    monkeypatch.setattr(podman_module, "join_netns", lambda *args: joined.append(args))
    engine = PodmanEngine(podman=str(script), workdir=tmp_path)
    with pytest.raises(EngineError):  # the stand-in lists no container after; the join came before
        engine.start(SPEC)
    assert joined == [("/var/run/netns/molt-order-1", 4242)]


def test_a_run_failure_that_is_not_about_subuid_is_reported_without_the_subuid_hint(tmp_path):
    podman = fake_podman(tmp_path, run_stderr="Error: debian:12: image not known\n", run_code=125)
    engine = PodmanEngine(podman=str(podman), workdir=tmp_path)
    with pytest.raises(EngineError) as raised:
        engine.start(SPEC)
    assert "image not known" in str(raised.value)
    assert "subuid" not in str(raised.value)
