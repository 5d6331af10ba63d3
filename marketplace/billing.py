"""Billing arithmetic: pure integer functions of micro-USD, bytes and seconds.

Every division rounds down, in the buyer's favour, so a bill never exceeds what the prices and
the counters say.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    captured + released == hold and fee + provider_amount == captured, always."""
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
