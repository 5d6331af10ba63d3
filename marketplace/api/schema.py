"""OpenAPI pieces the API's views share, for drf-spectacular: MOLT's own authentication
scheme, and the documented responses of service errors."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse

from meshnet.api.serializers import ErrorSerializer


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.auth.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "molt_...",
            "description": "An API token from POST /api/v1/auth/token/: "
            "`Authorization: Bearer molt_...`",
        }


def error_responses(described: dict[int, str]) -> dict[int, OpenApiResponse]:
    """OpenAPI responses for service errors: status -> when it happens."""
    return {
        code: OpenApiResponse(ErrorSerializer, description=text) for code, text in described.items()
    }


# The errors any operation may answer besides those its view documents: what DRF and MOLT's
# exception handler (docs/api.md, "Errors") give for a malformed request (400: a body that does
# not parse, a query parameter out of range), a missing or unknown API token (401, only where
# the operation takes one), a caller without the right (403), an object that does not exist
# or is not the caller's (404, only where the path names one), and a body of a media type the
# operation does not parse (415, only where it takes a body), and the database unreachable for
# the moment (503 `unavailable`, marketplace.api.errors: a connection lost mid-request, nothing
# of the request committed). Found by Schemathesis (tests/db/test_api_fuzz.py) and the faults
# tier: without them every such answer was an undocumented status code.
_COMMON_ERRORS = {
    400: "malformed request: the body or a query parameter is not what the schema says",
    401: "no valid API token or session",
    403: "the caller may not do this",
    404: "no such object, or not the caller's",
    415: "the body's Content-Type is not one the operation takes",
    503: "`unavailable`: the database could not be reached or dropped the connection, or the "
    "cache that keeps log-in and rate-limit counts (Redis) could not be reached; nothing of the "
    "request was written. Retry after Retry-After seconds (a write with the same "
    "Idempotency-Key)",
}
_RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "seconds to wait before retrying",
    }
}


def document_common_errors(result, generator, request, public):
    """drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS): one error shape, documented
    on every operation for the statuses every operation can answer."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    error = schemas.get("Error", {"type": "object"})
    # One shape for every 4xx/5xx body: `{"detail", "code"}`, with `{field: [message]}` beside
    # them for errors about one input (marketplace.api.errors.validation_body).
    error["required"] = ["detail", "code"]
    error["additionalProperties"] = {
        "description": "messages about the input of that name",
        "oneOf": [{"type": "array"}, {"type": "object"}, {"type": "string"}],
    }
    schemas["Error"] = error
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            for status, text in _COMMON_ERRORS.items():
                if status == 401 and not operation.get("security"):
                    continue
                if status == 404 and "{" not in path:
                    continue
                if status == 415 and "requestBody" not in operation:
                    continue
                documented = {"content": dict(ref), "description": text}
                if status == 503:
                    documented["headers"] = dict(_RETRY_AFTER)
                responses.setdefault(str(status), documented)
            _plain_text_errors(operation)
    return result


def _plain_text_errors(operation: dict) -> None:
    """An operation that answers text/plain (orders' wireguard.conf) renders an error as its
    message in text/plain when the client asks for text (`Accept: text/plain`, `?format=txt`):
    documented beside the JSON body. Schemathesis found `?format=txt` answering an undocumented
    text/plain 401 and 404."""
    responses = operation.get("responses", {})
    if not any(
        "text/plain" in (response.get("content") or {})
        for status, response in responses.items()
        if status.startswith("2")
    ):
        return
    for status, response in responses.items():
        if status[0] in "45" and "application/json" in (response.get("content") or {}):
            response["content"] = {
                **response["content"],
                "text/plain": {"schema": {"type": "string", "description": "the error's detail"}},
            }
