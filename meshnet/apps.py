from django.apps import AppConfig


class MeshnetConfig(AppConfig):
    name = "meshnet"
    verbose_name = "Mesh network"

    def ready(self) -> None:
        from meshnet.ipplan import validate_plan

        # A plan with overlapping or misaligned blocks must stop the gateway at start-up.
        validate_plan()
