"""Byte counts for people: pure, no Django. Bandwidth is priced per GiB, so binary units."""

from __future__ import annotations

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(count: int) -> str:
    """`0 B`, `512 B`, `1.5 MiB`, `50 GiB`, never `108123956 bytes`."""
    value = float(int(count))
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f}".removesuffix(".0") + f" {unit}"
        value /= 1024
    raise AssertionError("unreachable")
