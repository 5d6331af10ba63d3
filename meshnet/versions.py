"""Driver and CUDA versions as numbers that sort: what a buyer's "at least 535.104" filter
compares. The agent reports them as NVML gives them ("550.54.14", "12.4"); each is stored as
text (what pages show) and as a key from version_key (what the database compares and indexes).
"""

from __future__ import annotations

import re

# Up to three dot-separated parts, each below 10,000: NVIDIA's drivers are "major.minor[.patch]"
# (535.104.05) and CUDA "major.minor" (12.4). A key keeps their order: 535.104.05 > 535.54.
_VERSION_RE = re.compile(r"^(\d{1,4})(?:\.(\d{1,4}))?(?:\.(\d{1,4}))?$")
_BASE = 10_000


def version_key(text: str | None) -> int | None:
    """The sortable integer of a version such as "550.54.14" or "12.4" (missing parts are 0),
    or None when `text` is not such a version (an empty or odd report matches no minimum)."""
    match = _VERSION_RE.match((text or "").strip())
    if match is None:
        return None
    major, minor, patch = (int(part or 0) for part in match.groups())
    return (major * _BASE + minor) * _BASE + patch
