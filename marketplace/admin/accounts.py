"""Users in the admin (credits granted by an operator), their API tokens and idempotency keys."""

from __future__ import annotations

import secrets
from decimal import Decimal

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import OuterRef, Subquery
from django.template.response import TemplateResponse

from marketplace import idempotency, ledger
from marketplace.admin.common import MAX_FORM_USD, User, usd
from marketplace.models import (
    Account,
    ApiToken,
    IdempotencyRecord,
    SshKey,
)
from marketplace.money import format_usd, usd_to_micro
from meshnet.admin import ReadOnlyAdmin


class GrantCreditsForm(forms.Form):
    amount = forms.DecimalField(
        label="USD per user",
        min_value=Decimal("0.000001"),
        max_value=MAX_FORM_USD,
        max_digits=13,
        decimal_places=6,
    )
    memo = forms.CharField(max_length=120, initial="operator grant")
    # Names this form: the same form submitted twice grants once (see grant_once).
    nonce = forms.CharField(widget=forms.HiddenInput, max_length=64)


def grant_once(operator, users, amount: int, memo: str, nonce: str) -> bool:
    """Grant `amount` micro-USD to each of `users`, in one transaction, at most once per
    `nonce` (marketplace.idempotency.once, keyed by the operator and the nonce): a second
    submission of the same form (a double click, a reload, the back button) moves nothing.
    Returns False, moving nothing, for a repeat."""
    ids = sorted(user.pk for user in users)
    try:
        with idempotency.once(
            operator,
            f"admin:grant_credits:{nonce}",
            what=f"granted {format_usd(amount, exact=True)} to users {ids}: {memo}",
        ):
            for user in users:
                ledger.grant_credits(
                    user, amount, memo=f"{memo} (by {operator.get_username()})"[:200]
                )
    except idempotency.AlreadyDone:
        return False
    return True


admin.site.unregister(User)


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    list_display = (*DjangoUserAdmin.list_display, "is_active", "wallet", "date_joined")
    actions = ["grant_credits"]

    def get_queryset(self, request):
        wallet = Account.objects.filter(user=OuterRef("pk"), kind=Account.Kind.WALLET)
        return (
            super()
            .get_queryset(request)
            .annotate(wallet_balance=Subquery(wallet.values("balance")[:1]))
        )

    @admin.display(description="wallet", ordering="wallet_balance")
    def wallet(self, user) -> str:
        return usd(user.wallet_balance or 0)

    def has_grant_permission(self, request) -> bool:
        return request.user.is_superuser or request.user.has_perm(
            "marketplace.add_ledgertransaction"
        )

    @admin.action(description="Grant credits to selected users", permissions=["grant"])
    def grant_credits(self, request, queryset):
        """An intermediate page asks for the amount; submitting it grants to every selected
        user through marketplace.ledger.grant_credits, once (grant_once)."""
        users = list(queryset.order_by("pk"))
        if "apply" in request.POST:
            form = GrantCreditsForm(request.POST)
            if form.is_valid():
                amount = usd_to_micro(form.cleaned_data["amount"])
                granted = grant_once(
                    request.user,
                    users,
                    amount,
                    form.cleaned_data["memo"],
                    form.cleaned_data["nonce"],
                )
                if granted:
                    names = ", ".join(user.get_username() for user in users)
                    self.message_user(request, f"Granted {usd(amount)} to each of: {names}.")
                else:
                    self.message_user(
                        request,
                        "This grant was already made (the form was submitted twice): "
                        "nothing more was granted.",
                        messages.WARNING,
                    )
                return None
        else:
            form = GrantCreditsForm(initial={"nonce": secrets.token_urlsafe(24)})
        for user in users:
            user.wallet_balance_usd = usd(user.wallet_balance or 0)
        return TemplateResponse(
            request,
            "frontend/ops/grant_credits.html",
            {
                **self.admin_site.each_context(request),
                "title": "Grant credits",
                "opts": self.model._meta,
                "users": users,
                "form": form,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "changelist_url": f"admin:{self.model._meta.app_label}_"
                f"{self.model._meta.model_name}_changelist",
            },
        )


# --- listings and orders ------------------------------------------------------------------------


@admin.register(ApiToken)
class ApiTokenAdmin(ReadOnlyAdmin):
    list_display = ("id", "user", "hint", "name", "created_at", "last_used_at")
    list_select_related = ("user",)
    search_fields = ("hint", "name", "user__username")

    def has_delete_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("marketplace.delete_apitoken")  # deleting revokes


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(ReadOnlyAdmin):
    list_display = ("user", "key", "status_code", "created_at")
    list_select_related = ("user",)
    search_fields = ("key", "user__username")
    date_hierarchy = "created_at"


# --- escrowed earnings, disputes, payouts, reliability, audits -----------------------------------
# Read-only lists. The operator actions on disputes (resolve, with the refund asked on an
# intermediate page) and payout requests (mark paid, reject) call marketplace.payments.


@admin.register(SshKey)
class SshKeyAdmin(ReadOnlyAdmin):
    list_display = ("user", "name", "fingerprint", "created_at")
    list_select_related = ("user",)
    search_fields = ("user__username", "name", "fingerprint")
