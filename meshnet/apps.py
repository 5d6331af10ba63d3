from django.apps import AppConfig


class MeshnetConfig(AppConfig):
    name = "meshnet"
    verbose_name = "Mesh network"

    def ready(self) -> None:
        from meshnet import peers  # noqa: F401 (connects its signal receivers: meshnet.signals)
        from meshnet.hub import check_hub_settings
        from meshnet.ipplan import validate_plan

        # A plan with overlapping or misaligned blocks must stop the gateway at start-up.
        validate_plan()
        check_hub_settings()
