"""Billing arithmetic: pure integer functions of micro-USD, bytes and seconds.

Every division rounds down, in the buyer's favour, so a bill never exceeds what the prices and
the counters say.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from marketplace.money import format_price

GIB = 1 << 30
SECONDS_PER_HOUR = 3600
BASIS_POINTS = 10_000


@dataclass(frozen=True)
class Quote:
    """The all-in price of an order before it is placed. `total_hold` is what the escrow holds."""

    time_charge: int
    bandwidth_allowance_bytes: int
    bandwidth_allowance_charge: int
    fee: int
    total_hold: int


def quote(
    *,
    price_per_gpu_hour: int,
    price_per_gib: int,
    gpu_count: int,
    hours: int,
    allowance_gib: int,
    fee_bps: int,
) -> Quote:
    if gpu_count < 1 or hours < 1:
        raise ValueError("gpu_count and hours must be at least 1")
    time_charge = price_per_gpu_hour * gpu_count * hours
    allowance_charge = price_per_gib * allowance_gib
    total = time_charge + allowance_charge
    return Quote(
        time_charge=time_charge,
        bandwidth_allowance_bytes=allowance_gib * GIB,
        bandwidth_allowance_charge=allowance_charge,
        # The fee is taken from what is captured, not added on top: shown so the buyer sees it.
        fee=fee_of(total, fee_bps),
        total_hold=total,
    )


def fee_of(amount: int, fee_bps: int) -> int:
    return amount * fee_bps // BASIS_POINTS


def time_charge(*, price_per_gpu_hour: int, gpu_count: int, seconds: int) -> int:
    return price_per_gpu_hour * gpu_count * max(seconds, 0) // SECONDS_PER_HOUR


def bandwidth_charge(*, price_per_gib: int, total_bytes: int) -> int:
    return price_per_gib * max(total_bytes, 0) // GIB


@dataclass(frozen=True)
class SettlementAmounts:
    time_charge: int
    bandwidth_charge: int
    captured: int
    fee: int
    provider_amount: int
    released: int


def settlement_amounts(
    *,
    hold: int,
    price_per_gpu_hour: int,
    price_per_gib: int,
    gpu_count: int,
    billed_seconds: int,
    total_bytes: int,
    fee_bps: int,
) -> SettlementAmounts:
    """Split a hold: captured = min(time + bandwidth, hold); fee from the captured amount;
    the provider gets the rest of it; the buyer gets back what was not captured.
    captured + released == hold and fee + provider_amount == captured, always.

    `total_bytes` is the order's bytes_in + bytes_out: the metered bytes of every key its job
    peer had (a re-keyed order's old keys included; see meshnet.models.JobPeerKey)."""
    t = time_charge(
        price_per_gpu_hour=price_per_gpu_hour, gpu_count=gpu_count, seconds=billed_seconds
    )
    b = bandwidth_charge(price_per_gib=price_per_gib, total_bytes=total_bytes)
    captured = min(t + b, hold)
    fee = fee_of(captured, fee_bps)
    return SettlementAmounts(
        time_charge=t,
        bandwidth_charge=b,
        captured=captured,
        fee=fee,
        provider_amount=captured - fee,
        released=hold - captured,
    )


# --- offline time ------------------------------------------------------------------------------

Interval = tuple[datetime, datetime]
_MICROSECOND = timedelta(microseconds=1)
_MICROSECONDS_PER_SECOND = 1_000_000  # time, not money


def covered(start: datetime, end: datetime, intervals: Iterable[Interval]) -> timedelta:
    """How much of [start, end) the union of `intervals` covers (overlaps counted once)."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if a < end and b > start)
    total = timedelta(0)
    cursor = start
    for a, b in clipped:
        a = max(a, cursor)
        if b > a:
            total += b - a
            cursor = b
    return total


def charged_seconds(start: datetime, end: datetime, outages: Iterable[Interval]) -> tuple[int, int]:
    """(charged, offline) whole seconds of the span [start, end) given the provider's outages.

    charged is the online time rounded down; offline is the rest of the span's whole seconds, so
    charged + offline == floor(end - start) and a fraction of a second offline is never billed.
    """
    if end <= start:
        return 0, 0
    span = (end - start) // _MICROSECOND
    online = span - covered(start, end, outages) // _MICROSECOND
    gross = span // _MICROSECONDS_PER_SECOND
    charged = online // _MICROSECONDS_PER_SECOND
    return charged, gross - charged


# --- receipts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiptLine:
    """One line of an order's receipt. The lines' amounts sum to what was captured."""

    kind: str  # time | offline_credit | bandwidth | hold_cap
    description: str
    amount: int
    seconds: int | None = None
    gpu_count: int | None = None
    bytes: int | None = None


def receipt_lines(
    *,
    gpu_count: int,
    price_per_gpu_hour: int,
    price_per_gib: int,
    billed_seconds: int,
    offline_seconds: int,
    bandwidth_bytes: int,
    captured: int,
) -> tuple[ReceiptLine, ...]:
    """The itemised lines of a settlement: the whole booked span used, less a credit for the
    provider's offline time, plus bandwidth, less whatever the hold could not cover. The credit
    is the difference of two rounded-down charges, so the lines add up to `captured` exactly."""
    gross = billed_seconds + offline_seconds
    time_gross = time_charge(
        price_per_gpu_hour=price_per_gpu_hour, gpu_count=gpu_count, seconds=gross
    )
    time_net = time_charge(
        price_per_gpu_hour=price_per_gpu_hour, gpu_count=gpu_count, seconds=billed_seconds
    )
    bandwidth = bandwidth_charge(price_per_gib=price_per_gib, total_bytes=bandwidth_bytes)
    lines = [
        ReceiptLine(
            kind="time",
            description=(
                f"{gpu_count} GPU x {gross} s at {format_price(price_per_gpu_hour)} per GPU-hour"
            ),
            amount=time_gross,
            seconds=gross,
            gpu_count=gpu_count,
        )
    ]
    if offline_seconds:
        lines.append(
            ReceiptLine(
                kind="offline_credit",
                description=f"provider node offline for {offline_seconds} s: not billed",
                amount=time_net - time_gross,
                seconds=offline_seconds,
                gpu_count=gpu_count,
            )
        )
    lines.append(
        ReceiptLine(
            kind="bandwidth",
            description=f"{bandwidth_bytes} bytes at {format_price(price_per_gib, 'gib')} per GiB",
            amount=bandwidth,
            bytes=bandwidth_bytes,
        )
    )
    beyond_hold = time_net + bandwidth - captured
    if beyond_hold:
        lines.append(
            ReceiptLine(
                kind="hold_cap",
                description="beyond the hold: never captured",
                amount=-beyond_hold,
            )
        )
    return tuple(lines)
