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
