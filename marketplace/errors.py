"""Errors of marketplace's write paths; the API maps each to a status and a clear message."""


class MarketError(Exception):
    status_code = 400
    code = "invalid"
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class InsufficientFunds(MarketError):
    status_code = 402
    code = "insufficient_funds"


class Oversold(MarketError):
    status_code = 409
    code = "oversold"
    field = "gpu_count"


class ListingUnavailable(MarketError):
    status_code = 409
    code = "listing_unavailable"
    field = "listing"


class InvalidTransition(MarketError):
    status_code = 409
    code = "invalid_state"


class AlreadyResolved(MarketError):
    status_code = 409
    code = "already_resolved"
