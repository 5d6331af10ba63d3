"""What the agent writes for a job: the simulated GPUs' CDI spec and the sshd material. The
sandbox tier proves podman and sshd accept them; here, their exact content."""

from __future__ import annotations

import base64
import json
import os
import stat

import nacl.signing
import pytest
from clawnode.gpu import SimulatedGpuReader
from clawnode.sandbox import sshd
from clawnode.sandbox.cdi import CdiGpus
from clawnode.sandbox.podman import _detail

pytestmark = [pytest.mark.unit]

GPUS = SimulatedGpuReader("A100:2", seed="material").read().gpus
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1eWVyLWtleS1mb3ItdGVzdHMtb25seS0wMDAwMDA alice"


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of the stand-in devices needs root")
def test_simulated_gpus_get_a_cdi_0_5_spec_with_each_index_and_all(tmp_path):
    cdi = CdiGpus(spec_dir=tmp_path / "cdi", sim_dir=tmp_path / "sim")

    cdi.prepare(GPUS)

    spec = json.loads((tmp_path / "cdi" / "molt-simulated-gpus.json").read_text())
    assert (spec["cdiVersion"], spec["kind"]) == ("0.5.0", "nvidia.com/gpu")
    assert [d["name"] for d in spec["devices"]] == ["0", "1", "all"]
    node = spec["devices"][1]["containerEdits"]["deviceNodes"][0]
    assert node == {
        "path": "/dev/nvidia1",
        "hostPath": str(tmp_path / "sim" / "nvidia1"),
        "type": "c",
        "major": 195,
        "minor": 1,
        "permissions": "rw",
    }
    assert len(spec["devices"][2]["containerEdits"]["deviceNodes"]) == 2
    info = (tmp_path / "sim" / "nvidia1").lstat()
    assert stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == 195
    # Whatever the umask: a sandbox's root is no root on the host and opens it as "other".
    assert stat.S_IMODE(info.st_mode) == 0o666
    assert os.minor(info.st_rdev) == 1
    assert cdi.devices([1, 0, 1]) == ("nvidia.com/gpu=0", "nvidia.com/gpu=1")
    assert cdi.env(GPUS[1:]) == {"NVIDIA_VISIBLE_DEVICES": GPUS[1].uuid}
    assert cdi.env(()) == {"NVIDIA_VISIBLE_DEVICES": "void"}


def test_real_gpus_without_the_toolkit_say_what_to_install(tmp_path):
    from clawnode.sandbox.engine import EngineError

    real = [gpu.__class__(**{**gpu.to_dict(), "simulated": False}) for gpu in GPUS]
    cdi = CdiGpus(spec_dir=tmp_path, sim_dir=tmp_path / "sim", nvidia_ctk="no-such-nvidia-ctk")
    with pytest.raises(EngineError, match="NVIDIA Container Toolkit is not installed"):
        cdi.prepare(real)


def test_job_material_is_private_fresh_and_key_only(tmp_path):
    first = sshd.write_material(tmp_path / "job", "molt-order-9", (KEY,), {"A": "b"})
    again = sshd.write_material(tmp_path / "job", "molt-order-9", (KEY,), {"A": "b"})

    ssh_dir = tmp_path / "job" / "ssh"
    assert first.mounts == {str(ssh_dir): "/etc/molt"}
    assert stat.S_IMODE((tmp_path / "job").stat().st_mode) == 0o700
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ssh_dir / "ssh_host_ed25519_key").stat().st_mode) == 0o600
    assert (ssh_dir / "authorized_keys").read_text() == KEY + "\n"
    config = (ssh_dir / "sshd_config").read_text().splitlines()
    for line in (
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "AuthorizedKeysFile /etc/molt/authorized_keys",
        "HostKey /etc/molt/ssh_host_ed25519_key",
        'SetEnv A="b"',
    ):
        assert line in config
    assert first.host_keys != again.host_keys  # a new key each time: never reused
    assert sshd.read_host_keys(tmp_path / "job") == again.host_keys


def test_host_key_file_holds_the_reported_public_key():
    seed = bytes(range(32))
    private, public = sshd.openssh_ed25519(seed, "molt-order-1")

    body = "".join(private.strip().splitlines()[1:-1])
    blob = base64.b64decode(body)
    assert blob.startswith(b"openssh-key-v1\0")
    expected = bytes(nacl.signing.SigningKey(seed).verify_key)
    kind, encoded, comment = public.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "molt-order-1")
    assert base64.b64decode(encoded).endswith(expected)
    assert seed + expected in blob  # the private section: seed then public key


def test_podman_errors_are_its_last_error_line_trimmed():
    stderr = (
        'time=... level=warning msg="cgroup v1 is deprecated"\n'
        "Error: setting up CDI devices: unresolvable CDI devices nvidia.com/gpu=9\n"
    )
    assert _detail(stderr) == "setting up CDI devices: unresolvable CDI devices nvidia.com/gpu=9"
    assert len(_detail("Error: " + "x" * 1000)) == 300
    assert _detail("") == "no message"
