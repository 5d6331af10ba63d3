"""The kernel backend against real kernel WireGuard: Debian's kernel in a VM (tests/vm/harness.py).

One boot runs, inside the guest, the netns tier's kernel backend test (which on a kernel with
WireGuard drives interface, peers, update in place, removal, deletion) and the guest-only tunnel
test (tests/vm/guest_tunnel.py). Here the host asserts that both passed, that the kernel backend
test took the kernel-WireGuard path rather than its refusal branch, and that the guest ran
Debian's kernel with the wireguard module loaded.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import CI
from tests.vm import harness

pytestmark = [pytest.mark.vm]

KERNEL_TEST = (
    "tests/netns/test_kernel_backend.py::test_kernel_backend_does_what_the_running_kernel_supports"
)
TUNNEL_TEST = "tests/vm/guest_tunnel.py::test_kernel_backend_carries_a_tunnel_to_a_wg_peer"
GUEST_PYTEST = [
    sys.executable,
    "-m",
    "pytest",
    "-p",
    "tests.vm.guest_plugin",
    "--noconftest",  # the suite's conftest wants PostgreSQL and Redis; these tests need neither
    "-q",
    "-rA",
    "--junitxml=/molt-out/junit.xml",
    "-W",
    "ignore::pytest.PytestConfigWarning",  # DJANGO_SETTINGS_MODULE without pytest-django
    KERNEL_TEST.split("::")[0],
    TUNNEL_TEST.split("::")[0],
]


@pytest.fixture(scope="module")
def guest():
    try:
        with harness.boot(GUEST_PYTEST) as run:
            print(
                f"\nvm tier: {run.accelerator} ({run.why_accelerator}), kernel {run.release}, "
                f"booted in {run.boot_s:.1f} s, guest pytest {run.command_s:.1f} s, "
                f"qemu {run.wall_s:.1f} s"
            )
            yield run
    except harness.VMUnavailable as exc:
        if CI:
            pytest.fail(f"vm tier cannot run: {exc}")
        pytest.skip(f"vm tier skipped: {exc}")


def test_guest_pytest_passed(guest):
    assert guest.exit_code == 0, guest.output
    outcomes = guest.junit()
    assert outcomes.get(KERNEL_TEST) == "passed", (outcomes, guest.output)
    assert outcomes.get(TUNNEL_TEST) == "passed", (outcomes, guest.output)


def test_guest_ran_debians_kernel_with_wireguard(guest):
    assert guest.release == harness.prepare_kernel().release
    assert any(line.split()[0] == "wireguard" for line in guest.modules.splitlines()), guest.modules


def test_kernel_backend_test_took_the_kernel_wireguard_path(guest):
    calls = json.loads((guest.out / "driver-calls.json").read_text())
    made = calls.get(KERNEL_TEST, [])
    methods = [call["method"] for call in made]
    assert methods[:1] == ["kernel_wireguard_available"], made
    assert made[0]["result"][0] is True, made[0]
    # The refusal branch stops after one failed ensure_interface; the kernel path goes on.
    for method in ("ensure_interface", "set_peer", "list_peers", "remove_peer", "delete_interface"):
        assert method in methods, made
    assert not [call for call in made if "error" in call], made
