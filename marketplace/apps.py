from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"

    def ready(self) -> None:
        # Subscribe to meshnet's peer hooks (acknowledged, removed) to move orders.
        from marketplace import receivers  # noqa: F401
