"""`manage.py staff_totp USERNAME`: give a staff member a new TOTP device (their old ones are
removed) and print its otpauth:// URI and key, this once: they are never stored in clear
anywhere else, nor logged. `--remove` deletes the devices instead, so the member enrols again
at their next admin visit (frontend/staff_otp.py)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django_otp.plugins.otp_totp.models import TOTPDevice

from frontend.staff_otp import reset_device, secret_text


class Command(BaseCommand):
    help = "Create or reset a staff member's TOTP device and print its URI once."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--remove",
            action="store_true",
            help="delete the member's devices; they enrol a new one at their next admin visit",
        )

    def handle(self, *args, username: str, remove: bool, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}")
        if not user.is_staff:
            raise CommandError(f"{username!r} is not staff: only staff accounts use a TOTP code")
        if remove:
            count, _ = TOTPDevice.objects.filter(user=user).delete()
            self.stdout.write(f"removed {username}'s TOTP devices ({count})")
            return
        device = reset_device(user)
        self.stdout.write(f"new TOTP device for {username} (shown this once, keep it secret):")
        self.stdout.write(f"  URI: {device.config_url}")
        self.stdout.write(f"  key: {secret_text(device)}")
