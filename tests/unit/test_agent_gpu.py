"""GPU inventory (clawnode.gpu): NvmlGpuReader's real code path on FakeNvml, simulated GPUs."""

from __future__ import annotations

import json

import pynvml
import pytest
from clawnode import wire
from clawnode.gpu import (
    DEFAULT_SIMULATED_MEMORY_MB,
    FakeGpu,
    FakeNvml,
    NvmlGpuReader,
    RecordedGpuReader,
    SimulatedGpuReader,
    SimulatedSpecError,
    parse_simulated_spec,
)

pytestmark = [pytest.mark.unit]

MIB = 1024 * 1024


def rtx4090(index: int, **extra) -> FakeGpu:
    return FakeGpu(
        name="NVIDIA GeForce RTX 4090",
        memory_bytes=24564 * MIB,
        uuid=f"GPU-4090-{index}",
        **extra,
    )


# -- NVML through the test double ----------------------------------------------------------------


def test_nvml_reader_reports_each_gpu_with_driver_and_cuda_versions():
    nvml = FakeNvml(
        gpus=[rtx4090(0, temperature_c=51, utilization_pct=87), rtx4090(1)],
        driver_version="550.54.15",
        cuda_driver_version=12040,
    )

    report = NvmlGpuReader(nvml=nvml).read()

    assert report.reason == ""
    assert [gpu.to_dict() for gpu in report.gpus] == [
        {
            "index": 0,
            "name": "NVIDIA GeForce RTX 4090",
            "memory_mb": 24564,
            "uuid": "GPU-4090-0",
            "driver_version": "550.54.15",
            "cuda_version": "12.4",
            "simulated": False,
        },
        {
            "index": 1,
            "name": "NVIDIA GeForce RTX 4090",
            "memory_mb": 24564,
            "uuid": "GPU-4090-1",
            "driver_version": "550.54.15",
            "cuda_version": "12.4",
            "simulated": False,
        },
    ]
    assert report.health[0].temperature_c == 51
    assert report.health[0].utilization_pct == 87
    assert not report.simulated
    assert report.summary() == "2 × NVIDIA GeForce RTX 4090"  # noqa: RUF001 (the output uses the multiplication sign)


def test_nvml_reader_shuts_nvml_down_after_every_read():
    nvml = FakeNvml(gpus=[rtx4090(0)])
    reader = NvmlGpuReader(nvml=nvml)

    reader.read()
    reader.read()

    assert (nvml.init_calls, nvml.shutdown_calls) == (2, 2)
    assert not nvml.initialized


def test_missing_driver_reports_no_gpus_and_says_why_without_raising():
    nvml = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    report = NvmlGpuReader(nvml=nvml).read()

    assert report.gpus == ()
    assert report.reason == "NVIDIA driver not found (libnvidia-ml.so.1 missing)"
    assert report.summary() == "none (NVIDIA driver not found (libnvidia-ml.so.1 missing))"
    assert nvml.shutdown_calls == 0  # nothing to shut down after a failed init


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "versions differ"),
        (pynvml.NVML_ERROR_UNKNOWN, "NVML failed to initialise"),
    ],
)
def test_each_driver_failure_has_its_own_reason(code, words):
    report = NvmlGpuReader(nvml=FakeNvml(init_error=code)).read()

    assert report.gpus == ()
    assert words in report.reason


def test_the_real_pynvml_on_this_machine_never_raises_and_explains_an_empty_inventory():
    # The development machines have no NVIDIA driver; a machine with GPUs must list real ones.
    report = NvmlGpuReader().read()

    if report.gpus:
        assert all(not gpu.simulated and gpu.memory_mb > 0 for gpu in report.gpus)
    else:
        assert report.reason


def test_unsupported_temperature_and_utilization_do_not_hide_the_gpu():
    nvml = FakeNvml(gpus=[rtx4090(0, temperature_c=None, utilization_pct=None)])

    report = NvmlGpuReader(nvml=nvml).read()

    assert len(report.gpus) == 1
    assert report.health[0].temperature_c is None
    assert report.health[0].utilization_pct is None


def test_a_lost_gpu_is_skipped_and_named_while_the_others_are_reported():
    nvml = FakeNvml(gpus=[rtx4090(0), rtx4090(1, broken=True), rtx4090(2)])

    report = NvmlGpuReader(nvml=nvml).read()

    assert [gpu.index for gpu in report.gpus] == [0, 2]
    assert "GPU 1 unreadable" in report.reason
    assert nvml.shutdown_calls == 1


def test_a_driver_with_no_gpus_says_so():
    report = NvmlGpuReader(nvml=FakeNvml(gpus=[], driver_version="550.54.15")).read()

    assert report.gpus == ()
    assert report.reason == "NVIDIA driver 550.54.15 is loaded but reports no GPUs"


def test_nvml_gpus_fit_the_enrolment_message():
    report = NvmlGpuReader(nvml=FakeNvml(gpus=[rtx4090(0)])).read()
    body = {
        "gpus": [gpu.to_dict() for gpu in report.gpus],
    }

    # What the reader produces must survive the wire type's validation unchanged.
    parsed = [wire.GpuInfo.from_dict(g) for g in body["gpus"]]
    assert tuple(parsed) == report.gpus


# -- simulated GPUs -----------------------------------------------------------------------------


def test_simulated_spec_is_parsed_into_names_and_counts():
    assert parse_simulated_spec("RTX 4090:2,A100 80GB:1") == (("RTX 4090", 2), ("A100 80GB", 1))
    assert parse_simulated_spec(" L4 : 3 , T4") == (("L4", 3), ("T4", 1))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "empty"),
        ("RTX 4090:0", "positive integer"),
        ("RTX 4090:two", "positive integer"),
        ("RTX 4090:-1", "positive integer"),
        ("RTX 4090:2,,A100:1", "empty item"),
        (":2", "name"),
        ("RTX\n4090:1", "name"),
        ("A100:65", "at most 64"),
        ("A100:40,H100:40", "at most 64"),
    ],
)
def test_bad_simulated_spec_is_refused_with_the_expected_form(spec, words):
    with pytest.raises(SimulatedSpecError) as info:
        parse_simulated_spec(spec)

    assert words in str(info.value)


def test_simulated_gpus_are_marked_simulated_with_known_memory_sizes():
    report = SimulatedGpuReader("RTX 4090:2,A100 80GB:1,Mystery X:1", seed="nd_x").read()

    assert [(g.index, g.name, g.memory_mb) for g in report.gpus] == [
        (0, "RTX 4090", 24564),
        (1, "RTX 4090", 24564),
        (2, "A100 80GB", 81920),
        (3, "Mystery X", DEFAULT_SIMULATED_MEMORY_MB),
    ]
    assert all(g.simulated for g in report.gpus)
    assert report.summary() == "2 × RTX 4090, 1 × A100 80GB, 1 × Mystery X (simulated)"  # noqa: RUF001 (the output uses the multiplication sign)


def test_simulated_uuids_are_stable_per_machine_and_differ_between_machines():
    first = SimulatedGpuReader("RTX 4090:2", seed="nd_a").read().gpus
    again = SimulatedGpuReader("RTX 4090:2", seed="nd_a").read().gpus
    other = SimulatedGpuReader("RTX 4090:2", seed="nd_b").read().gpus

    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert first[0].uuid != first[1].uuid
    assert {g.uuid for g in first}.isdisjoint(g.uuid for g in other)


# -- --simulated-gpus-file: the GPUs a demo node enrolled with -------------------------------------


def test_recorded_gpus_are_reported_as_listed_and_marked_simulated(tmp_path):
    """make run's real demo daemons report exactly what seed_demo enrolled (names, memory,
    UUIDs: the gateway's inventory stays as seeded), each marked simulated, whatever the file
    says about that."""
    listed = [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "uuid": "GPU-a",
         "simulated": True},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "uuid": "GPU-b",
         "simulated": False},
    ]  # fmt: skip
    path = tmp_path / "demo-gpus.json"
    path.write_text(json.dumps(listed))

    report = RecordedGpuReader(str(path)).read()

    assert [(g.index, g.name, g.memory_mb, g.uuid) for g in report.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 81559, "GPU-a"),
        (1, "NVIDIA H100 80GB HBM3", 81559, "GPU-b"),
    ]
    assert all(g.simulated for g in report.gpus)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[]", "not a non-empty JSON list"),
        ("{", "Expecting"),
        ('[{"index": 0}]', "name"),
        ('{"index": 0}', "not a non-empty JSON list"),
    ],
)
def test_a_bad_recorded_gpus_file_is_refused_naming_it(tmp_path, text, words):
    path = tmp_path / "gpus.json"
    path.write_text(text)
    with pytest.raises(SimulatedSpecError, match=words) as caught:
        RecordedGpuReader(str(path))
    assert str(path) in str(caught.value)
