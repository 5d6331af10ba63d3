"""Fixtures of the nat tier: one lab (internet, services, observers) per module."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nat import lab as nat_lab

PROBE = str(Path(__file__).with_name("probe.py"))


@pytest.fixture(scope="module")
def lab() -> Iterator[nat_lab.Lab]:
    with nat_lab.nat_lab() as the_lab:
        observer = the_lab.popen(
            the_lab.services,
            [sys.executable, PROBE, "observer", nat_lab.OBSERVER_A, nat_lab.OBSERVER_B],
            stdout=subprocess.PIPE,
            text=True,
        )
        # The observer prints "ready" once its four sockets are bound.
        assert observer.stdout is not None
        line = observer.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"observer did not start: {line!r}")
        yield the_lab
