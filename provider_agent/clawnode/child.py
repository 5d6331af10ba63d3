"""One operation of a clawnode module run in a short-lived child interpreter.

The long-lived agent never imports pyroute2 (about 8 MB of resident memory for good, for work
done once per link or sandbox): clawnode.backends.links and clawnode.sandbox.network run their
netlink work as ``python -m <module> OPERATION ARG...`` in a child, which answers one JSON line
on stdout, ``{"result": ...}`` or ``{"error": message, "errno": n}``, and exits. This module is
both ends of that: ``call`` in the parent, ``serve`` in the child. It imports nothing heavy.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# The directory that holds this copy of clawnode: first on the child's path, so the child runs
# the same code as the parent whatever is installed elsewhere.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

# name: (argument names, function); a last name ending in "..." repeats, zero or more times
Operations = Mapping[str, tuple[Sequence[str], Callable[..., Any]]]


class ChildError(Exception):
    """The child's operation failed (its message and errno), or the child itself did."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def call(module: str, operation: str, args: Sequence[str], timeout: float) -> Any:
    """Run ``python -m module operation *args`` in a child (this interpreter, no shell) and
    return its result (JSON types: a tuple comes back as a list). Raises ChildError."""
    what = " ".join((operation, *args))
    if not sys.executable:
        raise ChildError(f"{what}: cannot find the Python interpreter to run the helper")
    path = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=_PACKAGE_ROOT + (os.pathsep + path if path else ""))
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, operation, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ChildError(
            f"{what}: the pyroute2 helper gave no answer in {timeout:g} s", errno_mod.ETIMEDOUT
        ) from None
    except OSError as exc:
        message = f"{what}: cannot start the pyroute2 helper: {exc}"
        raise ChildError(message, exc.errno or 0) from None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not ("result" in answer or "error" in answer):
        stderr = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = stderr[-1][-300:] if stderr else "no output"
        raise ChildError(
            f"{what}: the pyroute2 helper failed (exit status {done.returncode}): {detail}"
        )
    if "error" in answer:
        raise ChildError(str(answer["error"]), int(answer.get("errno") or 0))
    return answer["result"]


def arity_ok(operations: Operations, operation: str, count: int) -> bool:
    names = operations[operation][0]
    if names and names[-1].endswith("..."):
        return count >= len(names) - 1
    return count == len(names)


def serve(module: str, operations: Operations, errors: type[Exception], argv: Sequence[str]) -> int:
    """The child's main: one operation, one JSON line on stdout. An `errors` exception is the
    operation's answer (with its errno, if it has one); anything else is a crash (a traceback
    on stderr, which ``call`` reports)."""
    if not argv or argv[0] not in operations or not arity_ok(operations, argv[0], len(argv) - 1):
        usage = " | ".join(" ".join((name, *names)) for name, (names, _) in operations.items())
        print(f"usage: python -m {module} {usage}", file=sys.stderr)
        return 2
    try:
        result = operations[argv[0]][1](*argv[1:])
    except errors as exc:
        print(json.dumps({"error": str(exc), "errno": getattr(exc, "errno", 0) or 0}))
        return 1
    print(json.dumps({"result": result}))
    return 0
