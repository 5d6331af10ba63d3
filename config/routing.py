"""Websocket routes. Agent authentication happens inside the consumer (challenge-response)."""

websocket_urlpatterns: list = []
