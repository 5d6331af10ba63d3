"""Drive a real clawnode WireGuard backend inside a network namespace, one call at a time.

Run as a script inside the namespace (``ip netns exec NS python backend_driver.py KIND``), it
reads one JSON request per line on stdin (``{"method": ..., "args": {...}}``), calls the
backend and answers one JSON line (``{"result": ...}`` or ``{"error", "message", "errno"}``).
``Driver`` is the test side. The backend object lives as long as the driver process, so a test
can interleave backend calls with what it does in other namespaces.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


class DriverError(Exception):
    def __init__(self, kind: str, message: str, errno: int) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.errno = errno


class Driver:
    """The test's handle on a backend living in namespace ``ns``."""

    def __init__(self, bed: Any, ns: str, kind: str) -> None:
        self.proc: subprocess.Popen[bytes] = bed.popen(
            ns,
            [sys.executable, str(SCRIPT), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""

    def call(self, method: str, timeout: float = 30, **args: Any) -> Any:
        self.send(method, **args)
        return self.reply(timeout)

    def send(self, method: str, **args: Any) -> None:
        """Ask without waiting for the answer (``reply``): two drivers asked at once."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"method": method, "args": args}).encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 30) -> Any:
        reply = json.loads(self._readline(timeout))
        if "error" in reply:
            raise DriverError(reply["error"], reply["message"], reply["errno"])
        return reply["result"]

    def _readline(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"backend driver gave no answer in {timeout} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"backend driver exited with {self.proc.wait(timeout=5)}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# -- the script side ------------------------------------------------------------------------------


def _serve(kind: str) -> None:
    from clawnode import reconcile
    from clawnode.backends.kernel import KernelBackend
    from clawnode.backends.links import kernel_wireguard_available
    from clawnode.backends.userspace import UserspaceBackend
    from clawnode.send_order import SendOrder
    from clawnode.wire import DesiredState

    backend: Any = UserspaceBackend() if kind == "userspace" else KernelBackend()
    orders: list[SendOrder] = []  # the agent's order of the sends, made by the first "order"

    def handle(method: str, args: dict[str, Any]) -> Any:
        if method == "pid":
            return backend.pid
        if method == "kernel_wireguard_available":
            return list(kernel_wireguard_available())
        if method in ("plan", "reconcile"):
            desired = DesiredState.from_dict(args["desired"])
            # The daemon's clock and the endpoints of the state it applied before, as the daemon
            # passes them (no endpoint moved on a live session unless it is still the one named).
            actions = reconcile.plan(
                desired, backend.list_peers(), now=int(time.time()), previous=args.get("previous")
            )
            names = [type(a).__name__ for a in actions]
            if method == "plan":  # what the agent would do, and which endpoints it would move
                moved = {
                    a.public_key: a.endpoint
                    for a in actions
                    if isinstance(a, reconcile.Update) and "endpoint" in a.changed
                }
                return {"actions": names, "moved": moved}
            results = reconcile.apply(backend, actions)
            return {"actions": names, "results": results}
        if method in ("order", "release"):
            # The daemon's reconcile with the order of the sends (clawnode.send_order): "order"
            # applies a state at once, node peers this node sends to second held back; "release"
            # waits until they are due and plans them again against the device as it is then.
            desired = DesiredState.from_dict(args["desired"])
            if not orders:
                orders.append(SendOrder(args["stagger"]))
            order, due = orders[0], None
            if method == "release":
                time.sleep(max(0.0, (order.pending() or 0.0) - time.monotonic()))
                due = order.release(time.monotonic())
            now, peers = int(time.time()), backend.list_peers()
            actions = reconcile.plan(desired, peers, now=now)
            actions = order.order(desired, peers, actions, now, time.monotonic())
            actions = [a for a in actions if due is None or a.public_key in due]
            reconcile.apply(backend, actions)
            return [{"action": type(a).__name__, **dataclasses.asdict(a)} for a in actions]
        if method == "connectivity":
            # The agent's check of its path to the hub (clawnode.connectivity), on this backend.
            from clawnode import connectivity

            result = connectivity.check(backend, DesiredState.from_dict(args["desired"]))
            return dataclasses.asdict(result)
        if method == "ensure_interface":
            args["private_key"] = base64.b64decode(args["private_key"])
        result = getattr(backend, method)(**args)
        if method in ("list_peers", "read_peers"):
            return {key: dataclasses.asdict(peer) for key, peer in result.items()}
        return result

    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"result": handle(request["method"], request.get("args", {}))}
        except Exception as exc:
            reply = {
                "error": type(exc).__name__,
                "message": str(exc),
                "errno": getattr(exc, "errno", 0) or 0,
            }
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
