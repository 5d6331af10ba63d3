"""Accounts: sign up, log in and out, password change, API tokens for the CLI and API, and the
SSH public keys that go into every order's sandbox.

Django's own auth views where they fit; every write goes through Django auth or
marketplace.tokens (API tokens are issued and revoked there, stored only as hashes)."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm, PasswordChangeForm, UserCreationForm
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from frontend.staff_otp import TOKEN_FIELD, StaffOtpLoginMixin, otp_required, otp_satisfied
from marketplace import ssh_keys as market_ssh_keys
from marketplace import tokens as market_tokens
from marketplace.errors import MarketError
from marketplace.models import ApiToken, SshKey
from marketplace.text import validate_visible_text
from meshnet.throttling import LoginGuard, SignUps, client_address, wait_message

LOGIN_URL = reverse_lazy("frontend:login")


def buyer_login_required(view):
    """login_required that sends people to this site's login page, not the admin's (the
    project's LOGIN_URL points at the admin, which refuses anyone but staff)."""
    return login_required(view, login_url=LOGIN_URL)


class SignUpForm(UserCreationForm):
    email = forms.EmailField(
        required=False, help_text="Optional. Only used to reach you about your orders."
    )

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ("username", "email")


def _safe_next(request: HttpRequest) -> str | None:
    target = request.POST.get("next") or request.GET.get("next")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return None


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect(_safe_next(request) or "frontend:marketplace")
    form = SignUpForm(request.POST or None)
    if request.method == "POST":
        # Counted per address before the form is checked: minting accounts by the hundred is
        # refused whether or not each attempt is valid.
        signups = SignUps(client_address(request))
        wait = signups.retry_after()
        if wait:
            form.add_error(None, wait_message(wait, "new accounts from your address"))
        else:
            signups.record()
    if request.method == "POST" and form.is_valid():
        user = form.save()
        # Log the new user in straight away (one backend: ModelBackend checked the password).
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome, {user.username}. Your account is ready.")
        return redirect(_safe_next(request) or "frontend:marketplace")
    return render(
        request, "frontend/accounts/signup.html", {"form": form, "next": _safe_next(request)}
    )


class GuardedLogin:
    """For a Django authentication form: refuse to check any password once the log-in guard
    (meshnet/throttling.py LoginGuard: this account from this address, this account from
    anywhere, this address for any account) is full, and count each wrong password. Used by
    the site's form and the admin's, so both surfaces share one count."""

    def clean(self):
        username = self.data.get("username", "") if hasattr(self, "data") else ""
        guard = LoginGuard(client_address(self.request), str(username))
        wait = guard.retry_after()
        if wait:
            raise ValidationError(wait_message(wait, "failed log-ins"), code="throttled")
        try:
            return super().clean()
        except ValidationError as exc:
            # A wrong authenticator code (staff, the admin's form) counts like a wrong password.
            if exc.code in {"invalid_login", "invalid_token"}:
                guard.record()
            raise


class ThrottledAuthenticationForm(GuardedLogin, AuthenticationForm):
    """Django's log-in form behind the log-in guard."""


class ThrottledAdminAuthenticationForm(GuardedLogin, StaffOtpLoginMixin, AdminAuthenticationForm):
    """The admin's log-in form behind the same guard (config/urls.py sets it on the site), with
    the staff's authenticator code (frontend/staff_otp.py)."""

    otp_token = TOKEN_FIELD


login_view = auth_views.LoginView.as_view(
    authentication_form=ThrottledAuthenticationForm,
    template_name="frontend/accounts/login.html",
    redirect_authenticated_user=True,
    next_page=reverse_lazy("frontend:marketplace"),
)
# POST only (Django 5): a link or an image on another page cannot log anyone out.
logout_view = auth_views.LogoutView.as_view(next_page=reverse_lazy("frontend:marketplace"))


class GuardedPasswordChangeForm(PasswordChangeForm):
    """The password change checks the old password: behind the same log-in guard, so a stolen
    session cannot be used to guess the account's password without limit (issue 15)."""

    def __init__(self, user, *args, request: HttpRequest, **kwargs) -> None:
        self.request = request
        super().__init__(user, *args, **kwargs)

    def clean_old_password(self):
        guard = LoginGuard(client_address(self.request), self.user.get_username())
        wait = guard.retry_after()
        if wait:
            raise ValidationError(wait_message(wait, "failed log-ins"), code="throttled")
        try:
            return super().clean_old_password()
        except ValidationError:
            guard.record()
            raise


class GuardedPasswordChangeView(auth_views.PasswordChangeView):
    form_class = GuardedPasswordChangeForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}


password_change = buyer_login_required(
    GuardedPasswordChangeView.as_view(
        template_name="frontend/accounts/password_change.html",
        success_url=reverse_lazy("frontend:password_change_done"),
    )
)
password_change_done = buyer_login_required(
    auth_views.PasswordChangeDoneView.as_view(
        template_name="frontend/accounts/password_change_done.html"
    )
)


class TokenForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        required=False,
        label="Token name",
        validators=[validate_visible_text],
        help_text="What the token is for, e.g. “laptop CLI”.",
    )


def _tokens_page(request: HttpRequest, form: TokenForm, new_token: str | None) -> HttpResponse:
    tokens = ApiToken.objects.filter(user=request.user).order_by("-created_at", "-id")
    return render(
        request,
        "frontend/accounts/tokens.html",
        {"form": form, "tokens": tokens, "new_token": new_token},
    )


@never_cache  # the page with a new token must not be kept by any cache or the back button
@buyer_login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request: HttpRequest) -> HttpResponse:
    """GET lists the user's tokens; POST issues one and shows it in this response only. There
    is no redirect after the POST on purpose: the plaintext would have to be kept somewhere
    (a session, a message cookie) to survive it, and only its hash may be kept."""
    if request.method == "POST":
        form = TokenForm(request.POST)
        # A staff token acts with staff powers: only from a session that gave its TOTP code.
        if not otp_satisfied(request.user):
            form.add_error(
                None,
                "Staff accounts create tokens after giving their authenticator code: log in "
                "to the admin first.",
            )
        if form.is_valid():
            token = market_tokens.issue_api_token(
                request.user,
                name=form.cleaned_data["name"],
                # Only a staff session that gave its code gets here (otp_satisfied above).
                staff_code=request.user.is_staff and otp_required(),
            )
            return _tokens_page(request, TokenForm(), token)
        return _tokens_page(request, form, None)
    return _tokens_page(request, TokenForm(), None)


@buyer_login_required
@require_POST
def revoke_api_token(request: HttpRequest, token_id: int) -> HttpResponse:
    if not market_tokens.revoke_api_token(request.user, token_id):
        raise Http404("no such token of yours")
    messages.success(request, "Token revoked: requests that use it are refused from now on.")
    return redirect("frontend:api_tokens")


class SshKeyForm(forms.Form):
    name = forms.CharField(
        max_length=market_ssh_keys.NAME_MAX_LENGTH,
        required=False,
        label="Name",
        help_text="What the key is for, e.g. “laptop”. Defaults to the key's comment.",
    )
    public_key = forms.CharField(
        label="Public key",
        strip=False,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "autocomplete": "off"}),
        help_text="The one line of your <code>.pub</code> file, e.g. the output of "
        "<code>cat ~/.ssh/id_ed25519.pub</code>. "
        "Make a key with <code>ssh-keygen -t ed25519</code>.",
    )


@buyer_login_required
@require_http_methods(["GET", "POST"])
def ssh_keys(request: HttpRequest) -> HttpResponse:
    """GET lists the user's SSH keys; POST adds one (marketplace.ssh_keys checks it and names
    the field at fault) and redirects back."""
    form = SshKeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            key = market_ssh_keys.add_ssh_key(
                request.user,
                public_key=form.cleaned_data["public_key"],
                name=form.cleaned_data["name"],
            )
        except MarketError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        else:
            messages.success(
                request, f"Key “{key.name}” added ({key.fingerprint}): your next orders use it."
            )
            return redirect("frontend:ssh_keys")
    keys = list(SshKey.objects.filter(user=request.user))
    for key in keys:
        key.key_type = key.public_key.split(" ", 1)[0]
    return render(
        request,
        "frontend/accounts/ssh_keys.html",
        {"form": form, "keys": keys, "max_keys": SshKey.MAX_PER_USER},
    )


@buyer_login_required
@require_POST
def delete_ssh_key(request: HttpRequest, key_id: int) -> HttpResponse:
    if not market_ssh_keys.delete_ssh_key(request.user, key_id):
        raise Http404("no such key of yours")
    messages.success(request, "Key deleted. Orders already placed keep the keys they started with.")
    return redirect("frontend:ssh_keys")
