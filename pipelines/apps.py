from django.apps import AppConfig


class PipelinesConfig(AppConfig):
    name = "pipelines"

    def ready(self) -> None:
        from pipelines.services import on_version_ready
        from registry.signals import version_ready

        version_ready.connect(on_version_ready, dispatch_uid="pipelines.on_version_ready")
