"""Template filters for money, traffic and when a node was seen. Thin: marketplace.money formats;
these only let a template say which rule applies (an amount, a price per GPU-hour, a price per
GiB)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django import template
from django.utils import timezone
from django.utils.timesince import timesince

from marketplace.money import format_price, format_usd
from meshnet.units import format_bytes

register = template.Library()


def _blank(value) -> bool:
    return value is None or value == ""


@register.filter
def usd(micro: int | None) -> str:
    """An amount (balance, hold, charge, fee, total): `$2.49`, `$1.33`, `$0.008356`."""
    return "" if _blank(micro) else format_usd(int(micro))


@register.filter
def usd_exact(micro: int | None) -> str:
    """An amount with every digit it has (`$499.996644`), for a tooltip beside `usd`."""
    return "" if _blank(micro) else format_usd(int(micro), exact=True)


@register.filter
def hour_price(micro: int | None) -> str:
    """A price per GPU-hour: `$2.49`, exact."""
    return "" if _blank(micro) else format_price(int(micro), "hour")


@register.filter
def gib_price(micro: int | None) -> str:
    """A price per GiB: `$0.010`, `$0.012`, exact."""
    return "" if _blank(micro) else format_price(int(micro), "gib")


@register.filter
def iec_bytes(count: int | None) -> str:
    """`0 B`, `512 B`, `1.5 MiB`, `50 GiB`: binary units, as bandwidth is priced per GiB."""
    return "" if _blank(count) else format_bytes(int(count))


@register.filter
def iec_rate(bytes_per_second: float | None) -> str:
    """A bandwidth as `1.2 MiB/s`."""
    if _blank(bytes_per_second):
        return ""
    return f"{format_bytes(round(float(bytes_per_second)))}/s"


@register.filter
def seen_ago(moment: datetime | None) -> str:
    """How long ago a node was last heard from: `just now` under a minute (Django's timesince
    says `0 minutes` there, and a node a few seconds behind our clock too), else `5 minutes
    ago`."""
    if _blank(moment):
        return ""
    now = timezone.now()
    if now - moment < timedelta(minutes=1):
        return "just now"
    return f"{timesince(moment, now)} ago"
