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


class InvalidPeerKey(MeshError):
    status_code = 400
    code = "invalid_key"


class PeerKeyInUse(MeshError):
    status_code = 409
    code = "key_in_use"
