"""Errors of meshnet services. The API maps each to an HTTP status with a clear message."""


class MeshError(Exception):
    status_code = 400
    code = "mesh_error"


class PoolExhausted(MeshError):
    status_code = 409
    code = "pool_exhausted"

    def __init__(self, pool_name: str) -> None:
        super().__init__(f"address pool {pool_name!r} is exhausted: no free address")
        self.pool_name = pool_name


class EnrollmentRefused(MeshError):
    status_code = 403
    code = "enrollment_refused"


class UnknownRegion(MeshError):
    """A node declared a region that is not one of the IP plan's (ipplan.REGIONS)."""

    status_code = 400
    code = "unknown_region"
    field = "region"


class InvalidPeerKey(MeshError):
    status_code = 400
    code = "invalid_key"


class PeerKeyInUse(MeshError):
    status_code = 409
    code = "key_in_use"


class NotEnoughGpus(MeshError):
    """A sandbox asked for more GPUs of a node than are free. `transient`: enough would be free
    once sandboxes already leaving the node are gone (their GPUs are freed when the agent has
    removed them), so asking again shortly may succeed."""

    status_code = 409
    code = "not_enough_gpus"

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
