"""OpenAPI description of MOLT's own authentication, for drf-spectacular."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


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
