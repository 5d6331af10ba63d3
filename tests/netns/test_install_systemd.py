"""The install line's systemd path, for real: this machine's own root booted as a container with
systemd as PID 1 (systemd-nspawn), in a testbed namespace that reaches the live gateway, and
`curl -fsSL GATEWAY/install.sh | sh -s -- --token T` run in it as a user runs it, with the
default prefix and state directory. The unit must be written, enabled and running, the node
online; `systemctl stop` must end the agent.

The container's root is an overlay of / with a tmpfs upper layer, mounted in a mount namespace
of its own: everything the script writes (/opt/clawnode, /etc/systemd/system, /var/lib) lands
on the tmpfs and is gone when the container stops. nspawn refuses --directory=/ with
--volatile=overlay, hence the overlay by hand. Units this machine enables (databases, brokers,
timers) are masked on systemd's command line, so the container boots only systemd's own.

Step 2, apt, runs for real against a local repository. The testbed namespace has no way out of
the machine, so wireguard-tools and wireguard-go are fetched on this machine (`apt-get download`,
cached in /var/cache/molt-apt) into a flat repository bound into the container; in the
container's overlay apt knows only that repository and both packages are removed, so the
script's apt-get update and apt-get install must put them back. This machine's dpkg state and
apt sources are checked unchanged after. clawnode's Python dependencies come from the local
wheelhouse.

Step 1 gives podman's containers user subordinate ids: the container's /etc/subuid and
/etc/subgid lose this machine's containers entry first (as on a fresh machine), and must have
exactly one each after; this machine's files are checked unchanged."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshnet.enrolment import create_enrollment_token
from meshnet.models import Node
from tests.integration.conftest import running_gateway, wait_until
from tests.netns.test_install_script import CLEAN_ENV, STEP_LINE, build_wheelhouse
from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def masked_units() -> list[str]:
    """Every unit this machine enables, except targets: the container boots none of them."""
    names = {os.path.basename(p) for p in glob.glob("/etc/systemd/system/*.wants/*")}
    return sorted(name for name in names if not name.endswith(".target"))


def cgroup_dirs(name: str) -> list[Path]:
    """A cgroup `name` beside this process's own, in each hierarchy systemd uses (the name=systemd
    one and the unified one on a hybrid host, the unified one alone on a cgroup2 host).
    nspawn --keep-unit makes its payload/ and supervisor/ cgroups inside the cgroup it starts
    in; in one of its own they do not land in this process's cgroup, and are removed after."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        options = fields[-1]
        if fstype == "cgroup2":
            mounts["0::"] = fields[4]
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            mounts["name=systemd"] = fields[4]
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        key = "0::" if number == "0" else controllers
        if key in mounts:
            dirs.append(Path(mounts[key] + path.rstrip("/")) / name)
    return dirs


@dataclass
class Container:
    leader: int  # systemd's PID (1 inside)
    log: Path

    def sh(self, script: str, timeout: float = 60, check: bool = False):
        """`script` as root inside the container, with the environment sudo would give it."""
        return subprocess.run(
            ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
             "--pid", "--cgroup", "--root", "--wd", *CLEAN_ENV, "sh", "-c", script],
            capture_output=True, text=True, timeout=timeout, check=check,
        )  # fmt: skip

    def systemctl(self, *args: str) -> str:
        return self.sh(shlex.join(["systemctl", *args])).stdout.strip()


@contextlib.contextmanager
def booted_container(ns: str, tmp_path: Path, binds: list[Path]) -> Iterator[Container]:
    """This machine's root, booted by systemd-nspawn in network namespace `ns`."""
    name = f"molt-sd-{os.getpid() % 100000}"
    cgroups = cgroup_dirs(name)
    for directory in cgroups:
        directory.mkdir()
    top = tmp_path / "container"
    top.mkdir()
    log = tmp_path / "container.log"
    nspawn = ["--quiet", "--register=no",
              "--keep-unit", "--link-journal=no", "--console=read-only", f"--machine={name}",
              # The namespace is the container's own, yet nspawn drops CAP_NET_ADMIN unless
              # it made it; the agent needs it for its WireGuard device, as on a real machine.
              f"--network-namespace-path=/run/netns/{ns}", "--capability=CAP_NET_ADMIN",
              *(f"--bind-ro={path}" for path in binds), "--boot",
              "systemd.unit=multi-user.target",
              *(f"systemd.mask={unit}" for unit in masked_units())]  # fmt: skip
    script = (
        'for procs in $2; do echo $$ >"$procs"; done\n'
        'mount -t tmpfs molt-nspawn "$1"\n'
        'mkdir "$1/upper" "$1/work" "$1/root"\n'
        'mount -t overlay overlay -o lowerdir=/,upperdir="$1/upper",workdir="$1/work" "$1/root"\n'
        'exec systemd-nspawn --directory="$1/root" ' + shlex.join(nspawn)
    )
    procs = " ".join(str(directory / "cgroup.procs") for directory in cgroups)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation=private", "sh", "-ec", script, "sh", str(top),
             procs],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def leader() -> int | None:
            assert proc.poll() is None, f"systemd-nspawn exited\n{log.read_text()}"
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for child in children:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
            return None

        container = Container(leader=wait_until(leader, timeout=30, message="systemd"), log=log)

        def booted() -> str:
            # Empty until systemd listens on its private socket; then it waits for the boot.
            return container.sh("systemctl is-system-running --wait", timeout=60).stdout.strip()

        try:
            state = wait_until(booted, timeout=60, message="the container to boot")
        except AssertionError as timeout:
            raise AssertionError(f"{timeout}\n{log.read_text()}") from None
        # Degraded is fine (a unit of this machine failing in a container); starting is not.
        assert state in {"running", "degraded"}, state + log.read_text()
        yield container
    finally:
        if proc.poll() is None:
            proc.terminate()  # nspawn shuts the container down as a poweroff would
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for directory in cgroups:
            for sub in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


APT_CACHE = Path("/var/cache/molt-apt")
APT_PACKAGES = ("wireguard-tools", "wireguard-go")


@pytest.fixture(scope="module")
def apt_repo() -> Path:
    """A flat apt repository (`deb [trusted=yes] file:DIR ./`) of the packages the script's apt
    step installs, as this machine's apt fetches them. The .debs are kept in APT_CACHE, so only
    a new Debian version of either package downloads anything. The repository is there too, not
    under pytest's tmp_path: apt reads it as user _apt, and tmp_path's parents are root's only."""
    APT_CACHE.mkdir(parents=True, exist_ok=True)
    repo = APT_CACHE / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir()
    for directory in (APT_CACHE, repo):
        directory.chmod(0o755)
    for package in APT_PACKAGES:
        # `--print-uris` names the candidate's file without fetching it: 'URI' FILE SIZE HASH.
        uris = subprocess.run(
            ["apt-get", "download", "--print-uris", package],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert len(uris) >= 2, f"apt-get download --print-uris {package} named no file: {uris}"
        deb = APT_CACHE / uris[1]
        if not deb.exists():
            fetched = subprocess.run(["apt-get", "download", package], cwd=APT_CACHE,
                                     capture_output=True, text=True, timeout=120)  # fmt: skip
            assert fetched.returncode == 0 and deb.exists(), (
                f"apt-get download {package} did not fetch {deb.name} "
                f"(run apt-get update?)\n{fetched.stdout}{fetched.stderr}"
            )
        shutil.copy(deb, repo / deb.name)
    scan = subprocess.run(["dpkg-scanpackages", "--multiversion", ".", "/dev/null"], cwd=repo,
                          capture_output=True, text=True, check=True)  # fmt: skip
    (repo / "Packages").write_text(scan.stdout)
    return repo


def host_apt_state() -> dict[str, str]:
    """What the container's apt and dpkg must leave alone on this machine."""
    paths = [Path("/var/lib/dpkg/status"), Path("/etc/apt/sources.list"),
             *sorted(Path("/etc/apt/sources.list.d").iterdir())]  # fmt: skip
    state = {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"
        for path in paths
    }
    for tool in ("wg", "wireguard-go"):
        state[tool] = shutil.which(tool) or "absent"
    return state


SUBIDS = "containers:2147483647:2147483648"


def subid_files() -> dict[str, str | None]:
    """This machine's /etc/subuid and /etc/subgid, which the container must not change."""
    return {
        path: Path(path).read_text() if Path(path).exists() else None
        for path in ("/etc/subuid", "/etc/subgid")
    }


def kernel_has_wireguard(ns: str) -> bool:
    """As the script probes it: the container shares this machine's kernel."""
    added = subprocess.run(["ip", "-n", ns, "link", "add", "molt-wgprobe", "type", "wireguard"],
                           capture_output=True)  # fmt: skip
    if added.returncode == 0:
        subprocess.run(["ip", "-n", ns, "link", "del", "molt-wgprobe"], check=True)
    return added.returncode == 0


@pytest.fixture
def provider(django_user_model):
    return django_user_model.objects.create_user("carol", password="carol-pass-123")


def test_the_install_line_installs_packages_enables_and_starts_the_systemd_unit(
    tmp_path, settings, wheelhouse, apt_repo, provider
):
    # The test's own view of "online"; the agent heartbeats every 5 seconds.
    settings.MOLT_NODE_OFFLINE_AFTER_SECONDS = 10
    with network_testbed() as bed:
        ns = bed.namespace("insd")
        bed.attach(ns)
        wireguard_in_kernel = kernel_has_wireguard(ns)
        host_before = host_apt_state()
        with (
            running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway,
            booted_container(ns, tmp_path, binds=[wheelhouse, apt_repo]) as container,
        ):
            assert container.sh("cat /proc/1/comm").stdout.strip() == "systemd"
            # The next commands remove packages and apt sources: make sure they land in the
            # container's overlay, not on this machine.
            marker = f"/etc/molt-container-{os.getpid()}"
            container.sh(f"touch {marker}", check=True)
            assert not Path(marker).exists(), "the container writes to this machine's /etc"
            host_subids = subid_files()
            prepare = container.sh(
                "set -e\n"
                # A fresh machine's: no containers entry (this machine's comes from .ci/run).
                "touch /etc/subuid /etc/subgid\n"
                "sed -i /^containers:/d /etc/subuid /etc/subgid\n"
                "rm -f /etc/apt/sources.list.d/*\n"
                f"echo 'deb [trusted=yes] file:{apt_repo} ./' >/etc/apt/sources.list\n"
                f"dpkg -r --force-depends {' '.join(APT_PACKAGES)}\n"
                "! command -v wg\n"
            )
            assert prepare.returncode == 0, prepare.stdout + prepare.stderr
            assert host_apt_state() == host_before
            assert subid_files() == host_subids

            token = create_enrollment_token(provider).token
            result = container.sh(
                f"curl -fsSL {gateway.base_url}/install.sh | sh -s -- --insecure --token {token} "
                f"--find-links {wheelhouse} -- --simulated-gpus 'RTX 4090:2'",
                timeout=300,
            )
            output = result.stdout
            assert result.returncode == 0, output + result.stderr + gateway.logs()
            steps = STEP_LINE.findall(output)
            step2 = ("2", "installing wireguard-tools, nftables and python3-venv with apt-get")
            assert step2 in steps, output
            assert "Setting up wireguard-tools " in output, output
            installed = dict.fromkeys(APT_PACKAGES, True)
            if wireguard_in_kernel:
                assert "  the kernel has WireGuard" in output, output
                installed["wireguard-go"] = False  # the script installs it only when needed
            else:
                assert "  the kernel has no WireGuard module: installing wireguard-go" in output
                assert "Setting up wireguard-go " in output, output
            for package, expected in installed.items():
                status = container.sh(f"dpkg-query -W -f='${{Status}}' {package}").stdout
                assert (status == "install ok installed") == expected, (package, status)
            # The reinstalled wg works: it makes keys.
            keys = container.sh("wg genkey | wg pubkey")
            assert keys.returncode == 0 and len(keys.stdout.strip()) == 44, keys
            # Podman's --userns=auto for sandboxes has its ids: one entry in each file.
            for ids in ("/etc/subuid", "/etc/subgid"):
                assert f"  {ids}: added {SUBIDS}" in output, output
                entries = container.sh(f"grep ^containers: {ids}").stdout.splitlines()
                assert entries == [SUBIDS], (ids, entries)
            assert subid_files() == host_subids
            step6 = ("6", "installing and starting clawnode.service")
            assert steps[-1] == step6
            assert "  /etc/systemd/system/clawnode.service: active" in output
            joined = re.search(r"^done: (node-\d+) joined the mesh at ", output, re.M)
            assert joined, output

            unit = container.sh("cat /etc/systemd/system/clawnode.service").stdout
            assert ("ExecStart=/opt/clawnode/bin/clawnode run --state-dir /var/lib/clawnode "
                    '--simulated-gpus "RTX 4090:2"') in unit.splitlines()  # fmt: skip
            assert "WantedBy=multi-user.target" in unit.splitlines()
            # Nothing of it on this machine: the container wrote to its overlay.
            assert not Path("/etc/systemd/system/clawnode.service").exists()
            assert container.systemctl("is-enabled", "clawnode") == "enabled"
            assert container.systemctl("is-active", "clawnode") == "active"
            pid = int(container.systemctl("show", "-p", "MainPID", "--value", "clawnode"))
            assert pid > 0
            # systemd split ExecStart's quoted argument as the shell would have.
            cmdline = container.sh(f"cat /proc/{pid}/cmdline").stdout.split("\0")
            assert cmdline[-3:] == ["--simulated-gpus", "RTX 4090:2", ""], cmdline

            node = Node.objects.get(name=joined.group(1))
            assert node.owner == provider

            def journal() -> str:
                return container.sh("journalctl -u clawnode --no-pager -n 50").stdout

            try:
                wait_until(lambda: Node.objects.get(pk=node.pk).online, timeout=30,
                           message="the service's agent to heartbeat")  # fmt: skip
                seen = Node.objects.get(pk=node.pk).last_seen_at
                wait_until(lambda: Node.objects.get(pk=node.pk).last_seen_at > seen, timeout=30,
                           message="a second heartbeat")  # fmt: skip
            except AssertionError as timeout:
                raise AssertionError(f"{timeout}\n{journal()}\n{gateway.logs()}") from None

            stop = container.sh("systemctl stop clawnode")
            assert stop.returncode == 0, stop.stderr
            assert container.systemctl("is-active", "clawnode") == "inactive"
            # It stopped on SIGTERM cleanly, not killed after the stop timeout.
            assert container.systemctl("show", "-p", "Result", "--value", "clawnode") == "success"
            assert container.sh(f"test -e /proc/{pid}").returncode != 0
            assert container.systemctl("is-enabled", "clawnode") == "enabled"
            wait_until(
                lambda: not Node.objects.get(pk=node.pk).online,
                timeout=30,
                message="the node to go offline after systemctl stop",
            )
        # Nothing of the container's apt and dpkg work on this machine.
        assert host_apt_state() == host_before
        assert not Path(marker).exists()
