"""Template context every page gets."""

from __future__ import annotations

from django.conf import settings


def demo(request) -> dict[str, bool]:
    """demo_simulated_agents: this gateway serves `make run` with SIMULATED demo agents, whose
    tunnels carry no traffic (a simulated-GPU badge says so only then: real demo daemons and
    test machines with simulated GPUs do carry packets)."""
    return {"demo_simulated_agents": settings.MOLT_DEMO_SIMULATED_AGENTS}
