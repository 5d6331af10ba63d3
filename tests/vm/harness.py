"""Boot Debian's own kernel under qemu with this machine's root filesystem, run pytest inside.

The development machines' kernels have no WireGuard, so the agent's KernelBackend (pyroute2 over
generic netlink) cannot meet a real kernel WireGuard there. This harness gives it one:

- the kernel is the one Debian ships (``linux-image-amd64``'s current dependency), fetched with
  ``apt-get download`` and unpacked into a cache, never installed into the host's /boot;
- a tiny initramfs (static busybox and the modules for 9p and overlayfs) mounts the host's ``/``
  read-only over virtio-9p with a tmpfs overlay on top, so the guest runs the host's Python, venv,
  repository and ``wg``/``ip`` binaries while writing only to its own memory;
- a second 9p share, a temporary directory of the host's, carries the guest's script in and its
  results (pytest's exit status, output and JUnit XML) out; then the guest powers off.

The guest's network has no link to anything outside it (``-nic none``). KVM is used when it can
run an ordinary kernel; otherwise qemu emulates the CPU (TCG), which proves the same things,
slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the initramfs must load to reach the shared root; everything else (wireguard, veth,
# bridge) the guest's kernel loads on demand with the host's modprobe, as a real host would.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
QEMU = "qemu-system-x86_64"


class VMUnavailable(Exception):
    """The VM cannot be prepared here (a tool, the kernel package or the accelerator is missing)."""


class VMFailed(Exception):
    """The VM was prepared but did not run the guest command to its end."""


def which(tool: str) -> str | None:
    # depmod and modprobe live in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which(tool) or shutil.which(tool, path=SBIN_PATH)


def missing_tools() -> str | None:
    """Why the vm tier cannot run here, or None. (The kernel package is fetched on first use.)"""
    for tool, package in (
        (QEMU, "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("depmod", "kmod"),
        ("modprobe", "kmod"),
        ("dpkg-deb", "dpkg"),
    ):
        if which(tool) is None:
            return f"needs {tool} (apt-get install --no-install-recommends {package})"
    return None


def cache_dir() -> Path:
    configured = os.environ.get("MOLT_VM_CACHE")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/cache/molt-vm")
    return Path.home() / ".cache" / "molt-vm"


def run(*args: str, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        done = subprocess.run(
            list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VMUnavailable(f"{' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise VMUnavailable(
            f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-800:]}"
        )
    return done.stdout


# -- the kernel ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    release: str  # uname -r, e.g. 6.1.0-56-amd64
    root: Path  # the unpacked package: boot/, lib/modules/<release>/

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def current_kernel_package() -> str:
    """The package linux-image-amd64 depends on now (Debian's current kernel)."""
    out = run("apt-cache", "depends", "linux-image-amd64", timeout=60)
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise VMUnavailable(
        "apt-cache depends linux-image-amd64 names no linux-image-* package (run apt-get update?)"
    )


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_kernel() -> Kernel:
    """Debian's current kernel, unpacked and depmod'ed in the cache (fetched once per version).

    MOLT_VM_KERNEL=<release> picks an already cached release instead of asking apt.
    """
    cache = cache_dir()
    pinned = os.environ.get("MOLT_VM_KERNEL")
    if pinned:
        kernel = Kernel(pinned, cache / pinned)
        if not (kernel.root / ".complete").exists():
            raise VMUnavailable(f"MOLT_VM_KERNEL={pinned}: {kernel.root} is not a prepared kernel")
        return kernel
    package = current_kernel_package()
    release = package.removeprefix("linux-image-")
    kernel = Kernel(release, cache / release)
    with locked(cache / ".lock"):
        if (kernel.root / ".complete").exists():
            return kernel
        work = cache / f".{release}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        run("apt-get", "download", package, cwd=work)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise VMUnavailable(f"apt-get download {package} left no .deb in {work}")
        unpacked = work / "root"
        run("dpkg-deb", "-x", str(debs[-1]), str(unpacked))
        depmod = which("depmod")
        assert depmod is not None  # missing_tools() checked it
        run(depmod, "-b", str(unpacked), release)
        for deb in debs:
            deb.unlink()
        shutil.rmtree(kernel.root, ignore_errors=True)
        unpacked.rename(kernel.root)
        (kernel.root / ".complete").write_text(package + "\n")
        shutil.rmtree(work, ignore_errors=True)
    if not kernel.image.exists():
        raise VMUnavailable(f"{package} has no {kernel.image.name}")
    return kernel


# -- the initramfs ------------------------------------------------------------------------------

INIT = r"""#!/bin/busybox sh
# PID 1 until switch_root: reach the host's root over 9p, put a tmpfs overlay on it, hand over.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "molt-vm init: $*"; poweroff -f; sleep 60; }
for module in $(cat /modules/order); do
  insmod "/modules/$module" || fail "insmod $module failed"
done
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,ro,cache=loose" hostroot /lower || fail "cannot mount the host's root"
mount -t tmpfs -o mode=0755 upper /upper || fail "cannot mount the overlay's tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
  || fail "cannot mount the overlay"
mkdir -p /newroot/molt-out
mount -t 9p -o "$opts" molt-out /newroot/molt-out || fail "cannot mount the results share"
[ -f /newroot/molt-out/guest.sh ] || fail "the results share has no guest.sh"
umount /proc /sys /dev
exec switch_root /newroot /bin/sh /molt-out/guest.sh
"""


def static_binary(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        phoff = struct.unpack_from("<Q", header, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def busybox() -> Path:
    found = which("busybox")
    if found is None or not static_binary(Path(found)):
        raise VMUnavailable(
            f"the initramfs needs a static busybox, {found or 'none'} is not "
            "(apt-get install busybox-static)"
        )
    return Path(found)


def module_files(kernel: Kernel, names: tuple[str, ...]) -> list[Path]:
    """The .ko files for `names` and their dependencies, in load order."""
    modprobe = which("modprobe")
    assert modprobe is not None
    files: list[Path] = []
    for name in names:
        out = run(modprobe, "-d", str(kernel.root), "-S", kernel.release, "--show-depends", name)
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in files:
                files.append(Path(parts[1]))
    return files


class Cpio:
    """A newc archive, the initramfs format (no cpio binary needed)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.inode = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.chunks.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self.chunks.append(data + b"\0" * (-len(data) % 4))

    def bytes(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.chunks)


def build_initramfs(kernel: Kernel, target: Path) -> None:
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "lower", "upper", "newroot", "modules"):
        archive.add(directory, 0o040755)
    archive.add("dev/console", 0o020600, rdev=(5, 1))
    archive.add("init", 0o100755, INIT.encode())
    archive.add("bin/busybox", 0o100755, busybox().read_bytes())
    files = module_files(kernel, ROOT_MODULES)
    for ko in files:
        archive.add(f"modules/{ko.name}", 0o100644, ko.read_bytes())
    archive.add("modules/order", 0o100644, "".join(f"{ko.name}\n" for ko in files).encode())
    target.write_bytes(gzip.compress(archive.bytes(), compresslevel=1))


# -- running ------------------------------------------------------------------------------------


def choose_accelerator() -> tuple[str, str]:
    """(kvm or tcg, why). MOLT_VM_ACCEL=kvm|tcg overrides."""
    forced = os.environ.get("MOLT_VM_ACCEL", "")
    if forced in {"kvm", "tcg"}:
        return forced, "MOLT_VM_ACCEL"
    if forced:
        raise VMUnavailable(f"MOLT_VM_ACCEL={forced!r}: expected kvm or tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    if Path("/sys/module/kvm_pvm").exists():
        # Checked on these machines: nested "PVM" KVM runs a stock kernel, but at a crawl (SeaBIOS
        # alone takes ten seconds, the kernel's decompressor minutes): only PVM-built guests run
        # at speed there. Emulation is faster.
        return "tcg", "/dev/kvm is kvm-pvm, which runs only PVM-enabled guest kernels at speed"
    return "kvm", "/dev/kvm"


GUEST_SCRIPT = """#!/bin/sh
# PID 1 after switch_root, on the overlay of the host's root. Writes results to /molt-out.
exec >/molt-out/guest.log 2>&1
set -u
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# The host has no /lib/modules for this kernel: show the unpacked package there.
mkdir -p /lib/modules/{release}
mount --bind {modules} /lib/modules/{release}
# /tmp stays the overlay's (no tmpfs of its own): the checkout and its venv may live under the
# host's /tmp, as CI's clean clones do, and writes land in the overlay's tmpfs anyway.
echo molt-vm > /proc/sys/kernel/hostname
ip link set lo up
cut -d' ' -f1 /proc/uptime > /molt-out/started
cd {repo}
env -i PATH={path} HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 \\
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 MOLT_VM_GUEST=1 MOLT_VM_OUT=/molt-out \\
  MOLT_VM_TIME_SCALE={scale} \\
  {command} >/molt-out/output.log 2>&1
echo $? > /molt-out/exit
uname -r > /molt-out/release
cat /proc/modules > /molt-out/modules
cut -d' ' -f1 /proc/uptime > /molt-out/finished
sync
echo o > /proc/sysrq-trigger
sleep 60
"""


@dataclass
class GuestRun:
    accelerator: str
    why_accelerator: str
    release: str  # the kernel the guest reported running
    exit_code: int  # the guest command's
    output: str  # the guest command's stdout and stderr
    modules: str  # the guest's /proc/modules at the end
    boot_s: float  # guest uptime when its command started
    command_s: float  # guest uptime spent in the command
    wall_s: float  # host time from qemu's start to its exit
    out: Path  # the results share (removed when the run's context ends)
    console: str = field(repr=False, default="")

    def junit(self) -> dict[str, str]:
        """nodeid-ish "path::name" -> passed | failed | error | skipped, from the guest's XML."""
        cases: dict[str, str] = {}
        # Written by the guest's pytest, a program of ours, into a directory only we share.
        tree = ET.parse(self.out / "junit.xml")  # noqa: S314
        for case in tree.iter("testcase"):
            module = case.get("classname", "").replace(".", "/") + ".py"
            outcome = "passed"
            for child in case:
                if child.tag in {"failure", "error", "skipped"}:
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
            cases[f"{module}::{case.get('name')}"] = outcome
        return cases


def guest_timeout(accelerator: str) -> float:
    configured = os.environ.get("MOLT_VM_TIMEOUT")
    if configured:
        return float(configured)
    return 240.0 if accelerator == "kvm" else 900.0


@contextlib.contextmanager
def boot(command: list[str], *, memory_mb: int = 1024) -> Iterator[GuestRun]:
    """Boot the VM, run `command` (argv) as root in the repository inside it, power off.
    The guest's writes live in its memory (`memory_mb`), a loop-mounted file's included.

    Yields the guest's results; the results directory lives until the context ends. Raises
    VMUnavailable when the VM cannot be prepared, VMFailed when it did not finish the command.
    """
    reason = missing_tools()
    if reason is not None:
        raise VMUnavailable(reason)
    accelerator, why = choose_accelerator()
    kernel = prepare_kernel()
    # TCG runs Python 20-50 times slower than native: the test helpers' timeouts, sized for
    # native speed, stretch by this factor in the guest (tests/vm/guest_plugin.py).
    scale = 1 if accelerator == "kvm" else 20
    qemu = which(QEMU)
    assert qemu is not None
    with tempfile.TemporaryDirectory(prefix="molt-vm-") as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        if "," in str(out):
            raise VMUnavailable(f"{out}: qemu's -fsdev cannot take a path with a comma")
        initrd = work / "initrd.gz"
        build_initramfs(kernel, initrd)
        python_bin = str(Path(sys.executable).parent)
        script = GUEST_SCRIPT.format(
            release=kernel.release,
            modules=shlex.quote(str(kernel.modules)),
            repo=shlex.quote(str(REPO)),
            path=shlex.quote(f"{python_bin}:{SBIN_PATH}"),
            scale=scale,
            command=" ".join(shlex.quote(arg) for arg in command),
        )
        (out / "guest.sh").write_text(script)
        console = work / "console.log"
        argv = [
            qemu,
            *(["-accel", "kvm", "-cpu", "host", "-smp", "2"] if accelerator == "kvm" else []),
            # Measured here: one emulated CPU boots in a third of the time two take, and the
            # guest's work is sequential anyway (pytest waits on the backend driver).
            *(["-accel", "tcg", "-cpu", "max", "-smp", "1"] if accelerator == "tcg" else []),
            "-m",
            str(memory_mb),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
            "-serial",
            f"file:{console}",
            "-kernel",
            str(kernel.image),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 panic=-1 quiet",
            "-fsdev",
            "local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev",
            f"local,id=out,path={out},security_model=none",
            "-device",
            "virtio-9p-pci,fsdev=out,mount_tag=molt-out",
        ]
        timeout = guest_timeout(accelerator)
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VMFailed(
                f"the VM ({accelerator}) did not power off within {timeout:g} s "
                f"(MOLT_VM_TIMEOUT)\n{tail(console)}\n{tail(out / 'guest.log')}"
            ) from None
        wall = time.monotonic() - started
        if not (out / "exit").exists():
            raise VMFailed(
                f"the guest ended without running its command (qemu exit {done.returncode}: "
                f"{done.stderr.strip()[-500:]})\n{tail(console)}\n{tail(out / 'guest.log')}"
            )
        started_at = float(read(out / "started") or 0)
        yield GuestRun(
            accelerator=accelerator,
            why_accelerator=why,
            release=read(out / "release"),
            exit_code=int(read(out / "exit")),
            output=(out / "output.log").read_text(errors="replace"),
            modules=read(out / "modules"),
            boot_s=started_at,
            command_s=float(read(out / "finished") or 0) - started_at,
            wall_s=wall,
            out=out,
            console=console.read_text(errors="replace") if console.exists() else "",
        )


def read(path: Path) -> str:
    return path.read_text(errors="replace").strip() if path.exists() else ""


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name}: none)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text)
