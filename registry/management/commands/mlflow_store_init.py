from django.core.management.base import BaseCommand

from registry import mlflow_store


class Command(BaseCommand):
    help = "Create or upgrade MLflow's tables in its backend store."

    def handle(self, *args: object, **options: object) -> None:
        mlflow_store.init_store()
