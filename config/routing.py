"""Websocket routes. Agent authentication happens inside the consumer (challenge-response)."""

from django.urls import path

from meshnet.consumers import AgentConsumer

websocket_urlpatterns = [path("ws/agent/", AgentConsumer.as_asgi())]
