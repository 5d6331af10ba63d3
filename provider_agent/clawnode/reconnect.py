"""The wait between the daemon's reconnects to the gateway (clawnode.daemon.Agent.run)."""

from __future__ import annotations

import random
from collections.abc import Callable


def reconnect_wait(backoff: float, draw: Callable[[], float] = random.random) -> float:
    """The wait before a reconnect: the backoff (0.5 s doubling to 30 s) times a random factor
    in [0.5, 1.5), so the thousands of agents a gateway restart drops at once come back spread
    over a second, then two, four..., not all in the same instant."""
    return backoff * (0.5 + draw())
