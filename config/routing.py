"""Websocket routes. Agent authentication happens inside the consumer (challenge-response);
browsers authenticate with their session cookie, and only from this site's own pages."""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from frontend.consumers import OrderConsumer
from frontend.provider_consumers import ProviderConsumer
from meshnet.consumers import AgentConsumer

websocket_urlpatterns = [
    path("ws/agent/", AgentConsumer.as_asgi()),
    # A cookie-authenticated socket must refuse other origins (cross-site websocket hijacking).
    path(
        "ws/orders/<int:order_id>/",
        AllowedHostsOriginValidator(AuthMiddlewareStack(OrderConsumer.as_asgi())),
    ),
    path(
        "ws/provider/",
        AllowedHostsOriginValidator(AuthMiddlewareStack(ProviderConsumer.as_asgi())),
    ),
]
