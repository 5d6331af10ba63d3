from django.apps import AppConfig


class FrontendConfig(AppConfig):
    name = "frontend"

    def ready(self) -> None:
        from frontend import realtime  # noqa: F401  (connects the page realtime receivers)
