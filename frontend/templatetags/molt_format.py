"""Template filters for money: amounts are integers of micro-USD everywhere; people read USD."""

from __future__ import annotations

from django import template

from marketplace.money import format_usd

register = template.Library()


@register.filter
def usd(micro: int | None) -> str:
    """`$2.49`, `$0.005`, `$12,500.00`: at least cents, and every further digit the amount has,
    so a price of 5,000 micro-USD per GiB does not show as `$0.01` or `$0.00`."""
    if micro is None or micro == "":
        return ""
    return format_usd(int(micro))


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


@register.filter
def iec_bytes(count: int | None) -> str:
    """`0 B`, `512 B`, `1.5 MiB`, `50 GiB`: binary units, as bandwidth is priced per GiB."""
    if count is None or count == "":
        return ""
    value = float(int(count))
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@register.filter
def iec_rate(bytes_per_second: float | None) -> str:
    """A bandwidth as `1.2 MiB/s`."""
    if bytes_per_second is None or bytes_per_second == "":
        return ""
    return f"{iec_bytes(round(float(bytes_per_second)))}/s"
