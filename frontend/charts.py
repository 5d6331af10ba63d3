"""Bandwidth over time for an order's usage chart: pure, no database.

The input is the cumulative WireGuard counters of the order's keys (a re-keyed order has more
than one) as signed metering samples carried them; the output is the bytes moved in each
interval between samples and the geometry of a small inline SVG line chart (no chart library,
nothing loaded from elsewhere).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from meshnet.metering import Counters, delta


@dataclass(frozen=True)
class Interval:
    """Traffic between two samples, from the buyer's side: `bytes_in` is what the provider
    sent (its tx), `bytes_out` what it received (its rx)."""

    start: datetime
    end: datetime
    bytes_in: int
    bytes_out: int

    @property
    def seconds(self) -> float:
        return max((self.end - self.start).total_seconds(), 0.001)

    @property
    def rate_in(self) -> float:
        return self.bytes_in / self.seconds

    @property
    def rate_out(self) -> float:
        return self.bytes_out / self.seconds


def key_intervals(
    samples: Sequence[tuple[datetime, Mapping[Hashable, Counters]]],
) -> list[Interval]:
    """Per-interval traffic of several keys of one peer from time-ordered samples, each with the
    counters of the keys it carries. Each key is compared with its own last counters, as billing
    does; a key first seen after the first sample (the key a re-key added) counts all it shows.
    Bytes of a sample taken in the same second as the one before go into the next interval."""
    result: list[Interval] = []
    last: dict[Hashable, Counters] = {}
    start: datetime | None = None
    rx = tx = 0
    for at, counters in samples:
        for key, current in counters.items():
            previous = last.get(key)
            if previous is not None and current.epoch < previous.epoch:
                continue  # a late sample of an older epoch: keep the newer base
            if start is not None:
                key_rx, key_tx = delta(previous, current)
                rx, tx = rx + key_rx, tx + key_tx
            last[key] = current
        if start is None:
            start = at
        elif at > start:
            result.append(Interval(start=start, end=at, bytes_in=tx, bytes_out=rx))
            start, rx, tx = at, 0, 0
    return result


@dataclass(frozen=True)
class LineChart:
    """Geometry of a two-line chart in a `width` x `height` viewBox. `points_in`/`points_out`
    are SVG polyline points; `peak` is the rate (bytes/s) of the top grid line."""

    width: int
    height: int
    left: int
    bottom: int
    points_in: str
    points_out: str
    peak: float
    start: datetime
    end: datetime
    peak_in: float
    peak_out: float

    @property
    def mid_y(self) -> float:
        """Where the half-of-peak grid line goes."""
        return self.bottom / 2

    @property
    def half(self) -> float:
        """The rate (bytes/s) of the middle grid line: the y axis's middle label."""
        return self.peak / 2

    @property
    def mid_time(self) -> datetime:
        """The time under the middle of the x axis: its middle label."""
        return self.start + (self.end - self.start) / 2


def _nice_ceiling(value: float) -> float:
    """The next 1, 2 or 5 x 10^n at or above `value`, so the top grid line reads well."""
    if value <= 0:
        return 1.0
    magnitude = 1.0
    while magnitude * 10 <= value:
        magnitude *= 10
    while magnitude > value:
        magnitude /= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def line_chart(
    points: Sequence[Interval], *, width: int = 640, height: int = 180, left: int = 0
) -> LineChart | None:
    """The chart of `points` (rates plotted at each interval's end), or None with fewer than
    two intervals, since a single point makes no line."""
    if len(points) < 2:
        return None
    start, end = points[0].start, points[-1].end
    span = max((end - start).total_seconds(), 0.001)
    peak_in = max(p.rate_in for p in points)
    peak_out = max(p.rate_out for p in points)
    top = _nice_ceiling(max(peak_in, peak_out))
    bottom = height - 1  # keep a zero line visible inside the viewBox
    plot = width - left

    def polyline(rate_of) -> str:
        coordinates = []
        for p in points:
            x = left + plot * (p.end - start).total_seconds() / span
            y = bottom - bottom * rate_of(p) / top
            coordinates.append(f"{x:.1f},{y:.1f}")
        return " ".join(coordinates)

    return LineChart(
        width=width,
        height=height,
        left=left,
        bottom=bottom,
        points_in=polyline(lambda p: p.rate_in),
        points_out=polyline(lambda p: p.rate_out),
        peak=top,
        start=start,
        end=end,
        peak_in=peak_in,
        peak_out=peak_out,
    )
