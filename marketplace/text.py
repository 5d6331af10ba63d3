"""Free text that users enter and others read (SSH key names, API token names, dispute reasons):
refused when it holds invisible format characters, the bidi overrides and isolates above all,
which can make a page show something other than what was typed (issue 15). The one rule is
clawnode.wire.fields.hidden_format_character, which the agent protocol's text fields (node
hostnames, GPU names) follow too."""

from __future__ import annotations

from clawnode.wire.fields import hidden_format_character
from django.core.exceptions import ValidationError

from marketplace.errors import MarketError


def _message(hidden: str) -> str:
    return f"contains an invisible format character ({hidden}) that can disguise what it shows"


def check_visible_text(value: str, field: str) -> None:
    """Raise MarketError (400) naming ``field`` when ``value`` holds one."""
    hidden = hidden_format_character(value)
    if hidden:
        raise MarketError(f"{field} {_message(hidden)}", field=field)


def validate_visible_text(value: str) -> None:
    """The same, as a Django form or model field validator."""
    hidden = hidden_format_character(value)
    if hidden:
        raise ValidationError(f"This {_message(hidden)}.", code="invisible_character")
