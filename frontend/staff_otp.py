"""Staff accounts' second factor: a TOTP code (django-otp's TOTPDevice) for the admin and the
operators' dashboard.

- The admin's log-in form asks for the code after the password (StaffOtpAdminLoginForm); a wrong
  code counts towards the same LoginGuard limits as a wrong password.
- The admin's permission check (admin_has_permission) and StaffOtpMiddleware refuse a staff
  session that has not given a code; a staff member with no confirmed device is sent to
  enrol one (enrol view) before reaching any admin page.
- `manage.py staff_totp USERNAME` lets an operator create or reset a member's device.

MOLT_STAFF_OTP_REQUIRED=false turns all of this off (development only; docs/security.md).
Non-staff accounts are never asked for a code.
"""

from __future__ import annotations

import base64

from django import forms
from django.conf import settings
from django.contrib import admin
from django.contrib.admin import AdminSite
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse, reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods
from django_otp import devices_for_user, user_has_device
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from meshnet.throttling import LoginGuard, client_address, wait_message

DEVICE_NAME = "authenticator app"
TOKEN_FIELD = forms.CharField(
    label="Authenticator code",
    required=False,
    max_length=8,
    widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}),
    help_text="The 6-digit code from your authenticator app (staff accounts).",
)


def otp_required() -> bool:
    return settings.MOLT_STAFF_OTP_REQUIRED


def otp_satisfied(user) -> bool:
    """Whether this session's user may use staff pages as far as the second factor goes."""
    if not otp_required() or not user.is_authenticated or not user.is_staff:
        return True
    return bool(getattr(user, "is_verified", lambda: False)())


def admin_has_permission(request: HttpRequest) -> bool:
    """The admin site's check (config/urls.py sets it): Django's (active staff) and the code."""
    return AdminSite.has_permission(admin.site, request) and otp_satisfied(request.user)


def match_code(user, code: str):
    """The user's confirmed device that accepts `code` now, or None (each code works once)."""
    code = (code or "").strip().replace(" ", "")
    if not code.isdigit():
        return None
    for device in devices_for_user(user, confirmed=True):
        if device.verify_token(code):
            return device
    return None


class StaffOtpLoginMixin:
    """For the admin's authentication form, after GuardedLogin: a staff account with a device
    must give a code it accepts. A wrong or missing code is an `invalid_token` error, which
    GuardedLogin counts like a wrong password. A staff account without a device logs in on its
    password and is sent to enrol (StaffOtpMiddleware)."""

    def confirm_login_allowed(self, user):
        super().confirm_login_allowed(user)
        if not otp_required() or not user.is_staff or not user_has_device(user):
            return
        device = match_code(user, self.data.get("otp_token", ""))
        if device is None:
            raise ValidationError(
                "Enter a correct username, password and authenticator code.",
                code="invalid_token",
            )
        # django_otp's user_logged_in handler marks the session verified with this device.
        user.otp_device = device


def secret_text(device: TOTPDevice) -> str:
    """The key as authenticator apps take it when typed in: base32, no padding."""
    return base64.b32encode(device.bin_key).decode().rstrip("=")


def reset_device(user) -> TOTPDevice:
    """Replace every TOTP device of `user` with one new confirmed one (the operators' command)."""
    with transaction.atomic():
        TOTPDevice.objects.filter(user=user).delete()
        return TOTPDevice.objects.create(user=user, name=DEVICE_NAME, confirmed=True)


def _safe_next(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse("admin:index")


class EnrolForm(forms.Form):
    otp_token = TOKEN_FIELD


@never_cache
@login_required(login_url=reverse_lazy("frontend:login"))
@require_http_methods(["GET", "POST"])
def enrol(request: HttpRequest) -> HttpResponse:
    """A staff member with no confirmed device adds one: the page shows the otpauth:// URI and
    the key once per pending device; the first code the app shows confirms it."""
    user = request.user
    if not user.is_staff or not otp_required():
        raise Http404
    if user_has_device(user):
        # Replacing a device is an operator's job (`manage.py staff_totp`), never this page's:
        # a stolen password must not be enough to swap the second factor.
        return redirect(f"{reverse('admin:login')}?{urlencode({'next': _safe_next(request)})}")
    device = TOTPDevice.objects.filter(user=user, confirmed=False).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name=DEVICE_NAME, confirmed=False)
    form = EnrolForm(request.POST or None)
    if request.method == "POST":
        guard = LoginGuard(client_address(request), user.get_username())
        wait = guard.retry_after()
        code = request.POST.get("otp_token", "").strip().replace(" ", "")
        if wait:
            form.add_error(None, wait_message(wait, "failed log-ins"))
        elif code.isdigit() and device.verify_token(code):
            device.confirmed = True
            device.save(update_fields=["confirmed"])
            otp_login(request, device)
            return redirect(_safe_next(request))
        else:
            guard.record()
            form.add_error("otp_token", "That code is not the one the app shows now.")
    context = {
        "form": form,
        "uri": device.config_url,
        "secret": secret_text(device),
        "next": _safe_next(request),
    }
    return render(request, "frontend/accounts/staff_otp.html", context)


class StaffOtpMiddleware:
    """After django_otp's OTPMiddleware: a staff session without a code gets no admin page and
    no operators' dashboard. With no device it is sent to enrol; with one, to the admin's log-in
    (which asks for the code). The admin's own has_permission refuses it too."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if otp_required() and not otp_satisfied(request.user):
            response = self._gate(request)
            if response is not None:
                return response
        return self.get_response(request)

    def _gate(self, request: HttpRequest) -> HttpResponse | None:
        path = request.path_info
        admin_root, login, logout = (
            reverse("admin:index"),
            reverse("admin:login"),
            reverse("admin:logout"),
        )
        if not (path.startswith(admin_root) or path == reverse("frontend:ops")):
            return None
        if path == logout:
            return None
        back = urlencode({"next": request.get_full_path()})
        if not user_has_device(request.user):
            if path == login and request.method == "POST":
                return None
            return redirect(f"{reverse('frontend:staff_otp')}?{back}")
        if path == login:
            return None
        return redirect(f"{login}?{back}")
