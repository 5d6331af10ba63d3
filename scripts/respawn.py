"""Run a command, and run it again when it dies on its own: `make run`'s worker, beat and demo
agents (Procfile.dev). honcho stops every process when one exits, so a worker killed by the
OOM killer or a stray `kill -9` took the web process and beat down with it (issue 15, finding
7). A stop that is asked for (SIGTERM, SIGINT or SIGHUP) ends this process with exit status
0 once the command has stopped: honcho signals the whole process group, which the command
shares, so the command gets the signal itself (sent again, celery's worker would cut its warm
shutdown short); a signal sent to this process alone is passed on after FORWARD_AFTER_S. A
command that exits by itself is started again after a pause, 1 s doubling to 30 s, back to 1 s
once a run lasted a minute.

Usage: python scripts/respawn.py NAME COMMAND [ARG...]   (NAME labels its lines)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

FIRST_PAUSE_S = 1.0
LONGEST_PAUSE_S = 30.0
HEALTHY_RUN_S = 60.0
FORWARD_AFTER_S = 5.0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, command = argv[0], argv[1:]
    stopping: list[tuple[int, float]] = []

    def stop(signum, _frame) -> None:
        stopping.append((signum, time.monotonic()))

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    pause = FIRST_PAUSE_S
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(command)
        code = _wait(child, stopping)
        if stopping:
            break
        ran = time.monotonic() - started
        pause = FIRST_PAUSE_S if ran >= HEALTHY_RUN_S else pause
        print(
            f"[respawn] {name} exited on its own (rc={code}) after {ran:.0f} s; "
            f"starting it again in {pause:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + pause
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        pause = min(pause * 2, LONGEST_PAUSE_S)
    return 0


def _wait(child: subprocess.Popen, stopping: list[tuple[int, float]]) -> int:
    """The child's exit status; once a stop was asked for and the child still runs after
    FORWARD_AFTER_S (the signal reached this process alone), the signal is passed on once."""
    forwarded = False
    while (code := child.poll()) is None:
        if stopping and not forwarded and time.monotonic() - stopping[0][1] > FORWARD_AFTER_S:
            child.send_signal(stopping[0][0])
            forwarded = True
        time.sleep(0.1)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
