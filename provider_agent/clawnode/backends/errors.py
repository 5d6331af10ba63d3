"""The error every WireGuard backend raises. Its own module, importing nothing: the link helper
child (backends.links) raises it too and must start quickly."""

from __future__ import annotations

__all__ = ["WireGuardError"]


class WireGuardError(Exception):
    """A WireGuard operation failed. ``errno`` is the positive errno when one is known, else 0."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
