"""GPU inventory: NVML on real machines, a simulated inventory for demos, a test double.

``GpuReader`` is the interface the agent uses. ``NvmlGpuReader`` is the real one: it talks to
the NVIDIA driver through pynvml (nvidia-ml-py) and never raises for a missing or broken driver;
it reports no GPUs and says why. ``SimulatedGpuReader`` serves ``--simulated-gpus`` on machines
without a GPU (every GPU it reports is marked simulated, and the gateway accepts those only when
its settings allow); ``RecordedGpuReader`` serves ``--simulated-gpus-file``, a fixed list of
simulated GPUs (a demo node reporting exactly the GPUs it was enrolled with). ``FakeNvml``
stands in for the pynvml module in tests, so tests run ``NvmlGpuReader``'s own code path on
machines with no NVIDIA hardware (design/testing.md: the one allowed stand-in is hardware the
machine lacks).

No Django.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .wire import GpuInfo

__all__ = [
    "DEFAULT_SIMULATED_MEMORY_MB",
    "SIMULATED_MEMORY_MB",
    "FakeGpu",
    "FakeNvml",
    "GpuHealth",
    "GpuReader",
    "GpuReport",
    "NvmlGpuReader",
    "RecordedGpuReader",
    "SimulatedGpuReader",
    "SimulatedSpecError",
    "parse_simulated_spec",
]

_T = TypeVar("_T")

MAX_GPUS = 64  # wire.EnrollRequest accepts at most 64 GPUs
MAX_NAME_LEN = 100  # the gateway stores GPU names in 100 characters

# Memory of well-known models in MiB, as NVML reports it (total framebuffer). Anything else is
# simulated with DEFAULT_SIMULATED_MEMORY_MB. Keys are compared case-insensitively.
SIMULATED_MEMORY_MB: dict[str, int] = {
    "RTX 3090": 24576,
    "RTX 4090": 24564,
    "RTX 5090": 32607,
    "RTX A6000": 49140,
    "RTX 6000 Ada": 49140,
    "A10": 23028,
    "A100": 40960,
    "A100 40GB": 40960,
    "A100 80GB": 81920,
    "H100": 81559,
    "H100 80GB": 81559,
    "H200": 143771,
    "L4": 23034,
    "L40S": 46068,
    "T4": 15360,
    "V100": 16384,
}
DEFAULT_SIMULATED_MEMORY_MB = 24576  # 24 GB
_TIMES = "\u00d7"  # the multiplication sign: "2 × RTX 4090"  # noqa: RUF003
_MEMORY_BY_NAME = {name.casefold(): mb for name, mb in SIMULATED_MEMORY_MB.items()}


@dataclass(frozen=True)
class GpuHealth:
    """Live readings of one GPU; None where the driver does not support the reading."""

    index: int
    temperature_c: int | None = None
    utilization_pct: int | None = None


@dataclass(frozen=True)
class GpuReport:
    """One inventory reading. ``reason`` says why ``gpus`` is empty (or what was skipped)."""

    gpus: tuple[GpuInfo, ...]
    reason: str = ""
    health: tuple[GpuHealth, ...] = ()

    @property
    def simulated(self) -> bool:
        return any(gpu.simulated for gpu in self.gpus)

    def summary(self) -> str:
        """'2 \u00d7 RTX 4090, 1 \u00d7 A100 80GB (simulated)' or 'none (<the reason>)'."""
        if not self.gpus:
            return f"none ({self.reason})" if self.reason else "none"
        counts: dict[str, int] = {}
        for gpu in self.gpus:
            counts[gpu.name] = counts.get(gpu.name, 0) + 1
        text = ", ".join(f"{n} {_TIMES} {name}" for name, n in counts.items())
        if self.simulated:
            text += " (simulated)"
        if self.reason:
            text += f"; {self.reason}"
        return text


class GpuReader(Protocol):
    def read(self) -> GpuReport: ...


# -- NVML ---------------------------------------------------------------------------------------


def _text(value: object) -> str:
    # Older pynvml releases return bytes for names and versions; current ones return str.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _cuda_version(raw: int) -> str:
    # NVML encodes the CUDA driver version as 1000 * major + 10 * minor (12040 -> "12.4").
    return f"{raw // 1000}.{(raw % 1000) // 10}"


class NvmlGpuReader:
    """Reads GPUs through NVML. ``nvml`` is the pynvml module (or FakeNvml in tests).

    Every read is nvmlInit ... nvmlShutdown, so a driver installed or fixed while the agent runs
    is picked up by the next read, and the library is not held between reads.
    """

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            try:
                import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no types
            except ImportError:
                nvml = None
            else:
                nvml = pynvml
        self._nvml = nvml

    def read(self) -> GpuReport:
        nvml = self._nvml
        if nvml is None:
            return GpuReport((), reason="NVML bindings not installed (pip install nvidia-ml-py)")
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return GpuReport((), reason=self._init_failure(exc))
        try:
            return self._read_devices()
        except nvml.NVMLError as exc:
            return GpuReport((), reason=f"NVML failed while listing GPUs: {exc}")
        finally:
            # A failed shutdown leaves nothing useful to do; the next read initialises again.
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()

    def _init_failure(self, exc: Exception) -> str:
        nvml = self._nvml
        reasons: list[tuple[str, str]] = [
            ("NVMLError_LibraryNotFound", "NVIDIA driver not found (libnvidia-ml.so.1 missing)"),
            (
                "NVMLError_DriverNotLoaded",
                "NVIDIA driver installed but not loaded (is the nvidia kernel module loaded?)",
            ),
            (
                "NVMLError_NoPermission",
                "no permission to use the NVIDIA driver (run clawnode as root)",
            ),
            (
                "NVMLError_LibRmVersionMismatch",
                "NVIDIA driver and library versions differ (reboot after the driver update)",
            ),
        ]
        for class_name, reason in reasons:
            cls = getattr(nvml, class_name, None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return reason
        return f"NVML failed to initialise: {exc}"

    def _optional(self, read: Callable[[], _T]) -> _T | None:
        # Temperature and utilization are unsupported on some boards (and in some VMs); that
        # must not hide the GPU from the inventory.
        try:
            return read()
        except self._nvml.NVMLError:
            return None

    def _health(self, index: int, handle: object) -> GpuHealth:
        nvml = self._nvml
        temperature = self._optional(
            partial(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        )
        rates = self._optional(partial(nvml.nvmlDeviceGetUtilizationRates, handle))
        return GpuHealth(
            index=index,
            temperature_c=None if temperature is None else int(temperature),
            utilization_pct=None if rates is None else int(rates.gpu),
        )

    def _read_devices(self) -> GpuReport:
        nvml = self._nvml
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda_raw = self._optional(nvml.nvmlSystemGetCudaDriverVersion_v2)
        cuda = _cuda_version(int(cuda_raw)) if cuda_raw is not None else ""
        count = int(nvml.nvmlDeviceGetCount())
        gpus: list[GpuInfo] = []
        health: list[GpuHealth] = []
        skipped: list[str] = []
        for index in range(min(count, MAX_GPUS)):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))[:MAX_NAME_LEN]
                memory_mb = int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))[:128]
            except nvml.NVMLError as exc:
                # One broken GPU (fallen off the bus, say) must not hide the healthy ones.
                skipped.append(f"GPU {index} unreadable: {exc}")
                continue
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name,
                    memory_mb=memory_mb,
                    uuid=uuid,
                    driver_version=driver[:64],
                    cuda_version=cuda,
                )
            )
            health.append(self._health(index, handle))
        if count > MAX_GPUS:
            skipped.append(f"only the first {MAX_GPUS} of {count} GPUs are reported")
        reason = "; ".join(skipped)
        if count == 0:
            reason = f"NVIDIA driver {driver} is loaded but reports no GPUs"
        return GpuReport(tuple(gpus), reason=reason, health=tuple(health))


# -- simulated ----------------------------------------------------------------------------------


class SimulatedSpecError(ValueError):
    """A ``--simulated-gpus`` spec is malformed; the message shows the expected form."""


_SPEC_HELP = 'expected "NAME:COUNT[,NAME:COUNT...]", e.g. "RTX 4090:2,A100 80GB:1"'
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()+/-]*")


def parse_simulated_spec(spec: str) -> tuple[tuple[str, int], ...]:
    """``"RTX 4090:2,A100 80GB:1"`` -> ``(("RTX 4090", 2), ("A100 80GB", 1))``.

    A bare name means one GPU. Raises SimulatedSpecError naming the bad part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SimulatedSpecError(f"simulated GPU spec is empty; {_SPEC_HELP}")
    items: list[tuple[str, int]] = []
    for part in spec.split(","):
        item = part.strip()
        if not item:
            raise SimulatedSpecError(f"simulated GPU spec {spec!r} has an empty item; {_SPEC_HELP}")
        name, sep, count_text = item.rpartition(":")
        if not sep:
            name, count_text = item, "1"
        name = name.strip()
        count_text = count_text.strip()
        if not (count_text.isascii() and count_text.isdigit()) or int(count_text) < 1:
            raise SimulatedSpecError(
                f"simulated GPU count in {item!r} must be a positive integer; {_SPEC_HELP}"
            )
        if not name or not _NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LEN:
            raise SimulatedSpecError(
                f"simulated GPU name in {item!r} must be letters, digits, spaces and ._()+/- "
                f"(at most {MAX_NAME_LEN} characters); {_SPEC_HELP}"
            )
        items.append((name, int(count_text)))
    total = sum(count for _, count in items)
    if total > MAX_GPUS:
        raise SimulatedSpecError(f"simulated GPU spec asks for {total} GPUs; at most {MAX_GPUS}")
    return tuple(items)


def simulated_memory_mb(name: str) -> int:
    return _MEMORY_BY_NAME.get(name.casefold(), DEFAULT_SIMULATED_MEMORY_MB)


class SimulatedGpuReader:
    """GPUs that do not exist, for development and demo machines; each is marked simulated.

    ``seed`` (the node id) makes the UUIDs stable for one machine and distinct between machines.
    """

    def __init__(self, spec: str, *, seed: str = "") -> None:
        self._items = parse_simulated_spec(spec)
        self._seed = seed

    def read(self) -> GpuReport:
        gpus: list[GpuInfo] = []
        index = 0
        for name, count in self._items:
            for _ in range(count):
                digest = hashlib.sha256(f"{self._seed}/{index}/{name}".encode()).hexdigest()
                uuid = (
                    f"GPU-SIM-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-"
                    f"{digest[16:20]}-{digest[20:32]}"
                )
                gpus.append(
                    GpuInfo(
                        index=index,
                        name=name,
                        memory_mb=simulated_memory_mb(name),
                        uuid=uuid,
                        simulated=True,
                    )
                )
                index += 1
        return GpuReport(tuple(gpus))


class RecordedGpuReader:
    """The GPUs listed in a JSON file (a list of GpuInfo objects), every one marked simulated:
    `make run`'s demo nodes report the GPUs seed_demo enrolled them with (same names, memory
    and UUIDs, so the gateway's inventory stays as seeded). The file is read once, at start;
    a missing or malformed file raises (OSError, ValueError) naming it."""

    def __init__(self, path: str) -> None:
        try:
            items = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(items, list) or not items:
                raise ValueError("not a non-empty JSON list")
            gpus = tuple(GpuInfo.from_dict({**item, "simulated": True}) for item in items)
        except (ValueError, TypeError) as exc:  # ProtocolError is a ValueError
            raise SimulatedSpecError(f"{path}: not a list of GPUs ({exc})") from None
        self._report = GpuReport(gpus)

    def read(self) -> GpuReport:
        return self._report


# -- test double --------------------------------------------------------------------------------


@dataclass
class FakeGpu:
    """One GPU as FakeNvml reports it. ``broken=True`` makes every query of it fail."""

    name: str = "NVIDIA GeForce RTX 4090"
    memory_bytes: int = 24564 * 1024 * 1024
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    temperature_c: int | None = 40  # None: NVML_ERROR_NOT_SUPPORTED
    utilization_pct: int | None = 0
    broken: bool = False


@dataclass
class _FakeMemory:
    total: int
    free: int
    used: int


@dataclass
class _FakeUtilization:
    gpu: int
    memory: int


@dataclass
class FakeNvml:
    """A stand-in for the pynvml module, for machines without an NVIDIA GPU.

    It has the functions NvmlGpuReader calls, and raises pynvml's own exception classes (built
    from NVML return codes, as pynvml does), so the reader's error handling is the real one.
    ``init_error``: an NVML return code (e.g. pynvml.NVML_ERROR_LIBRARY_NOT_FOUND) that
    nvmlInit fails with. ``init_calls``/``shutdown_calls`` count calls, and ``initialized`` says
    whether the library is held right now.
    """

    gpus: Sequence[FakeGpu] = ()
    driver_version: str = "550.54.15"
    cuda_driver_version: int = 12040
    init_error: int | None = None
    init_calls: int = 0
    shutdown_calls: int = 0
    initialized: bool = False
    _pynvml: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import pynvml

        self._pynvml = pynvml

    # pynvml's exception classes and constants, so `except nvml.NVMLError` works on the double.
    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVMLError", "NVML_")):
            return getattr(self._pynvml, name)
        raise AttributeError(name)

    def _error(self, code: int) -> Exception:
        error: Exception = self._pynvml.NVMLError(code)  # pynvml maps the code to its subclass
        return error

    def _check(self) -> None:
        if not self.initialized:
            raise self._error(self._pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: object) -> FakeGpu:
        self._check()
        if not isinstance(handle, FakeGpu):
            raise self._error(self._pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if handle.broken:
            raise self._error(self._pynvml.NVML_ERROR_GPU_IS_LOST)
        return handle

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self._error(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check()
        self.shutdown_calls += 1
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._check()
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise self._error(self._pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: object) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> _FakeMemory:
        total = self._gpu(handle).memory_bytes
        return _FakeMemory(total=total, free=total, used=0)

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:
        gpu = self._gpu(handle)
        if sensor != self._pynvml.NVML_TEMPERATURE_GPU:
            raise self._error(self._pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu.temperature_c is None:
            raise self._error(self._pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.temperature_c

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> _FakeUtilization:
        gpu = self._gpu(handle)
        if gpu.utilization_pct is None:
            raise self._error(self._pynvml.NVML_ERROR_NOT_SUPPORTED)
        return _FakeUtilization(gpu=gpu.utilization_pct, memory=0)
