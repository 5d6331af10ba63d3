"""Joining a container to its sandbox's network after the container started.

The sandbox's network (clawnode.sandbox.network) is a named namespace with the inner end of a
veth, made by the agent before the container starts. An engine that cannot start a container
inside that namespace as it is starts the container with an empty namespace of its own, and the
agent then moves the veth over: Docker (no ``ns:`` network mode), and Podman with a user
namespace (a namespace the host made is owned by the host's user namespace, and the kernel
refuses the container's root the sysfs mount and network sysctls there; the container's own
namespace is owned by its user namespace).

``join_netns`` moves the links of the named namespace into the container's by its PID, replays
their addresses and routes (a moved link loses them), and binds the container's namespace over
the named path, so the name keeps meaning "this sandbox's network" for the network's own
teardown and after an agent restart.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from .engine import EngineError

__all__ = ["join_netns"]

_MAX_DETAIL = 300


def _last(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else "no message")[:_MAX_DETAIL]


def _run(*argv: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise EngineError(f"joining the sandbox's network failed: {_last(done.stderr)}")


def _ip(*args: str) -> None:
    _run("ip", *args)


def _ip_json(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["ip", "-j", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise EngineError(f"joining the sandbox's network failed: {_last(done.stderr)}")
    return list(json.loads(done.stdout or "[]") or [])


def join_netns(netns: str, pid: int) -> None:
    """Move the links of the named namespace ``netns`` (the sandbox's eth0) into the
    namespace of process ``pid`` with their addresses and routes, then bind that namespace
    over ``netns`` so the name now stands for it (and the empty old one goes)."""
    name = os.path.basename(netns)
    links = [
        link for link in _ip_json("-n", name, "-d", "link", "show") if link.get("ifname") != "lo"
    ]
    addresses = {
        row["ifname"]: row.get("addr_info", [])
        for row in _ip_json("-n", name, "addr", "show")
        if row.get("ifname") != "lo"
    }
    routes = _ip_json("-n", name, "route", "show")
    target = f"/proc/{pid}/ns/net"
    inside = ["nsenter", f"--net={target}", "ip"]
    for link in links:
        _ip("-n", name, "link", "set", link["ifname"], "netns", str(pid))
    _run(*inside, "link", "set", "lo", "up")
    for link in links:
        ifname = link["ifname"]
        for info in addresses.get(ifname, []):
            if info.get("family") == "inet":
                _run(
                    *inside,
                    "addr",
                    "add",
                    f"{info['local']}/{info['prefixlen']}",
                    "dev",
                    ifname,
                )
        _run(*inside, "link", "set", ifname, "up")
    # Routes: the on-link ones first (a gateway must be reachable when its route goes in).
    for route in sorted(routes, key=lambda r: "gateway" in r):
        if route.get("protocol") == "kernel":
            continue  # the kernel's own, back with the address
        args = ["route", "add", route["dst"]]
        if route.get("gateway"):
            args += ["via", route["gateway"]]
        if route.get("dev"):
            args += ["dev", route["dev"]]
        if "onlink" in route.get("flags", []):
            args.append("onlink")
        _run(*inside, *args)
    _run("umount", netns)
    _run("mount", "--bind", target, netns)
