import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from registry.audit import SYSTEM
from registry.people import user_create
from registry.roles import Role


class Command(BaseCommand):
    help = "Create the first admin account if there is none; print its login (kept in the state folder)."

    def handle(self, *args: object, **options: object) -> None:
        secret = settings.STATE_DIR / "admin_password"
        User = get_user_model()
        if not User.objects.filter(username="admin").exists():
            password = secrets.token_urlsafe(12)
            user = user_create(SYSTEM, "admin", [Role.ADMIN, Role.DATA_SCIENTIST, Role.RELEASE_MANAGER, Role.ONCALL],
                               password=password)
            user.is_staff = user.is_superuser = True
            user.save(update_fields=["is_staff", "is_superuser"])
            secret.parent.mkdir(parents=True, exist_ok=True)
            secret.write_text(password)
            secret.chmod(0o600)
        shown = secret.read_text().strip() if secret.exists() else "(set outside this state folder)"
        self.stdout.write(f"Admin login: admin / {shown}")
