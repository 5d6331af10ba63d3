"""NVIDIA CDI devices for job containers: ``nvidia.com/gpu=N`` names the engine passes with
``--device``, and the spec behind them.

Real GPUs: the spec comes from the NVIDIA Container Toolkit (``nvidia-ctk cdi generate``).
Simulated GPUs (clawnode.gpu.SimulatedGpuReader): the agent writes the spec itself, one device
per GPU index plus ``all``, whose device nodes are stand-in character devices it makes
(``mknod`` under ``sim_dir``, NVIDIA's major number), seen as /dev/nvidiaN inside the
container. ``sim_dir`` is /dev itself by default: a container in a user namespace may not
mknod, so runc bind-mounts each device node from the host path equal to its path in the
container (the CDI spec's hostPath is read for its numbers only), as it does for real GPUs'
/dev/nvidiaN. Either way the engine resolves the same names through the same CDI machinery, so the
tests run the code path real GPUs take.

The spec says ``cdiVersion`` 0.5.0 (Podman 4.3 refuses 0.6.0 and later) and lists ``all``
explicitly (that Podman resolves no implicit ``all``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..wire import GpuInfo
from .engine import EngineError

__all__ = ["CDI_KIND", "CDI_VERSION", "NVIDIA_MAJOR", "CdiGpus"]

CDI_KIND = "nvidia.com/gpu"
CDI_VERSION = "0.5.0"
NVIDIA_MAJOR = 195  # the NVIDIA driver's character-device major (/dev/nvidia0 is 195:0)
SIM_SPEC_NAME = "molt-simulated-gpus.json"
REAL_SPEC_NAME = "nvidia.yaml"


class CdiGpus:
    """Makes the CDI spec for the node's GPUs and names the devices of a job's GPU indexes."""

    def __init__(
        self,
        *,
        spec_dir: Path = Path("/etc/cdi"),
        sim_dir: Path = Path("/dev"),
        nvidia_ctk: str = "nvidia-ctk",
    ) -> None:
        self.spec_dir = Path(spec_dir)
        self.sim_dir = Path(sim_dir)
        self._nvidia_ctk = nvidia_ctk
        self._prepared: tuple[GpuInfo, ...] | None = None
        # Sandboxes start in parallel threads; the first to come writes the spec, and two
        # writers would race on the stand-in device nodes.
        self._lock = threading.Lock()

    def prepare(self, gpus: Sequence[GpuInfo]) -> None:
        """Write (or refresh) the spec for ``gpus``; a no-op when already done for the same."""
        inventory = tuple(gpus)
        with self._lock:
            if inventory == self._prepared:
                return
            if inventory and all(gpu.simulated for gpu in inventory):
                self._write_simulated(inventory)
            elif inventory:
                self._generate_real()
            self._prepared = inventory

    @staticmethod
    def devices(indexes: Iterable[int]) -> tuple[str, ...]:
        """The CDI names of the GPUs at ``indexes``: ("nvidia.com/gpu=0", ...)."""
        return tuple(f"{CDI_KIND}={index}" for index in sorted(set(indexes)))

    @staticmethod
    def env(gpus: Sequence[GpuInfo]) -> dict[str, str]:
        """The container environment naming its GPUs, as the NVIDIA runtime sets it."""
        if not gpus:
            return {"NVIDIA_VISIBLE_DEVICES": "void"}
        return {"NVIDIA_VISIBLE_DEVICES": ",".join(gpu.uuid for gpu in gpus)}

    # -- simulated ----------------------------------------------------------------------------

    def node_path(self, index: int) -> Path:
        return self.sim_dir / f"nvidia{index}"

    def _stand_in(self, index: int) -> Path:
        """The stand-in /dev/nvidiaN: a character device with NVIDIA's numbers, no driver behind
        it (opening it fails, as it would on a host whose driver is not loaded)."""
        path = self.node_path(index)
        wanted = os.makedev(NVIDIA_MAJOR, index)
        try:
            info = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == wanted:
                os.chmod(path, 0o666)  # noqa: S103  (the driver's own mode)
                return path
            path.unlink()
        os.mknod(path, 0o666 | stat.S_IFCHR, wanted)
        # 0666 as the NVIDIA driver makes its nodes (mknod's mode passes through the umask): a
        # sandbox's root is no root on the host and opens the node by its mode for others.
        os.chmod(path, 0o666)  # noqa: S103  (the driver's own mode)
        return path

    def _write_simulated(self, gpus: Sequence[GpuInfo]) -> None:
        try:
            self.sim_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            nodes = []
            for gpu in gpus:
                host = self._stand_in(gpu.index)
                nodes.append(
                    {
                        "path": f"/dev/nvidia{gpu.index}",
                        "hostPath": str(host),
                        "type": "c",
                        "major": NVIDIA_MAJOR,
                        "minor": gpu.index,
                        "permissions": "rw",
                    }
                )
        except OSError as exc:
            raise EngineError(
                f"cannot make the simulated GPU devices in {self.sim_dir}: {exc}"
            ) from exc
        devices: list[dict[str, object]] = [
            {"name": str(gpu.index), "containerEdits": {"deviceNodes": [node]}}
            for gpu, node in zip(gpus, nodes, strict=True)
        ]
        devices.append({"name": "all", "containerEdits": {"deviceNodes": nodes}})
        spec = {"cdiVersion": CDI_VERSION, "kind": CDI_KIND, "devices": devices}
        self._write(self.spec_dir / SIM_SPEC_NAME, json.dumps(spec, indent=2) + "\n")

    def _write(self, path: Path, text: str) -> None:
        # Atomic: the engine may read the directory while a job starts.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".molt-", suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            raise EngineError(f"cannot write the CDI spec {path}: {exc}") from exc

    # -- real ---------------------------------------------------------------------------------

    def _generate_real(self) -> None:
        ctk = shutil.which(self._nvidia_ctk)
        if ctk is None:
            raise EngineError(
                "the NVIDIA Container Toolkit is not installed (nvidia-ctk not found): "
                "it generates the CDI spec the GPUs are passed with"
            )
        # A simulated spec left from a demo would declare the same kind twice.
        (self.spec_dir / SIM_SPEC_NAME).unlink(missing_ok=True)
        try:
            done = subprocess.run(
                [ctk, "cdi", "generate", f"--output={self.spec_dir / REAL_SPEC_NAME}"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EngineError("nvidia-ctk cdi generate timed out") from exc
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
            raise EngineError(f"nvidia-ctk cdi generate failed: {last}")
