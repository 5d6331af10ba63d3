"""pytest plugin for the run inside the vm tier's guest (``-p tests.vm.guest_plugin``).

The guest runs pytest without the suite's conftest (it has no PostgreSQL or Redis, and its tests
need neither). This plugin does two things there:

- stretches the backend driver's answer timeouts by MOLT_VM_TIME_SCALE: under CPU emulation
  (TCG) a driver process takes tens of seconds just to import pyroute2;
- records which backend calls each test made, and what ``kernel_wireguard_available`` answered,
  to ``$MOLT_VM_OUT/driver-calls.json``. The host asserts on it that the kernel backend test took
  the kernel-WireGuard path (ensure_interface, set_peer, remove_peer ...), not the refusal branch
  it takes on kernels without WireGuard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

OUT = Path(os.environ.get("MOLT_VM_OUT", "/molt-out"))
SCALE = float(os.environ.get("MOLT_VM_TIME_SCALE", "1"))

calls: dict[str, list[dict[str, Any]]] = {}
current: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    from tests.netns import backend_driver

    original = backend_driver.Driver.call

    def call(self: Any, method: str, timeout: float = 30, **args: Any) -> Any:
        entry: dict[str, Any] = {"method": method}
        calls.setdefault(current[-1] if current else "", []).append(entry)
        try:
            result = original(self, method, timeout=timeout * SCALE, **args)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            raise
        if method == "kernel_wireguard_available":
            entry["result"] = result
        return result

    backend_driver.Driver.call = call  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    current.append(item.nodeid)
    try:
        return (yield)
    finally:
        current.pop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "driver-calls.json").write_text(json.dumps(calls, indent=1))
