from django.apps import AppConfig


class DeployerConfig(AppConfig):
    name = "deployer"
