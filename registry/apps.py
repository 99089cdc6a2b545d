from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"

    def ready(self) -> None:
        from django.core.signals import request_started

        from registry.dbhealth import renew_suspect_connections

        request_started.connect(renew_suspect_connections, dispatch_uid="registry.renew_suspect_connections")
