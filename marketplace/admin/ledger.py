"""The ledger in the admin: accounts, transactions (reversed by an action), entries, holds and
audit runs. Read-only: the ledger is append-only."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages

from marketplace import ledger
from marketplace.admin.common import ReadableFields, action_page, money, usd
from marketplace.errors import MarketError
from marketplace.models import (
    Account,
    AuditRun,
    EscrowHold,
    LedgerEntry,
    LedgerTransaction,
)
from meshnet.admin import ReadOnlyAdmin


@admin.register(Account)
class AccountAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = ("id", "kind", "user", "shown_balance", "created_at")
    list_filter = ("kind",)
    list_select_related = ("user",)
    search_fields = ("=id", "user__username")
    shown_balance = money("balance", "balance")
    readable = {"balance": "shown_balance"}


class EntryInline(admin.TabularInline):
    model = LedgerEntry
    extra = 0
    can_delete = False
    fields = readonly_fields = ("account", "shown_amount")
    shown_amount = money("amount", "amount")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class ReverseForm(forms.Form):
    text = forms.CharField(max_length=150, label="Why it is reversed")


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "memo", "created_at")
    list_filter = ("kind",)
    search_fields = ("=id", "memo")
    date_hierarchy = "created_at"
    inlines = [EntryInline]
    actions = ["reverse"]

    def has_reverse_permission(self, request) -> bool:
        return request.user.is_superuser or request.user.has_perm(
            "marketplace.add_ledgertransaction"
        )

    @admin.action(description="Reverse the selected grant", permissions=["reverse"])
    def reverse(self, request, queryset):
        """An intermediate page asks why; submitting it posts the exact opposite through
        ledger.reverse_transaction (at most once per transaction: a second submission is
        refused, moving nothing; refused too when the wallet already spent the credits)."""
        selected = list(queryset.order_by("pk")[:2])
        if len(selected) != 1:
            self.message_user(request, "Select exactly one transaction.", messages.ERROR)
            return None
        txn = selected[0]
        if "apply" in request.POST:
            form = ReverseForm(request.POST)
            if form.is_valid():
                try:
                    reversal = ledger.reverse_transaction(
                        txn, f"{form.cleaned_data['text']} (by {request.user.get_username()})"
                    )
                except MarketError as exc:
                    form.add_error("text", str(exc))
                else:
                    self.message_user(request, f"Transaction #{txn.pk} reversed by #{reversal.pk}.")
                    return None
        else:
            form = ReverseForm()
        return action_page(
            self,
            request,
            title=f"Reverse transaction #{txn.pk}",
            intro=f"{txn.kind}: {txn.memo}. Every entry is posted again with the opposite sign.",
            items=[
                f"{entry.account}: {usd(entry.amount)}"
                for entry in txn.entries.select_related("account__user").order_by("pk")
            ],
            form=form,
            action="reverse",
            selected=[txn.pk],
            submit="Reverse",
        )


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = ("id", "transaction", "account", "shown_amount")
    list_filter = ("account__kind", "transaction__kind")
    list_select_related = ("transaction", "account__user")
    search_fields = ("=transaction__id", "account__user__username")
    shown_amount = money("amount", "amount")
    readable = {"amount": "shown_amount"}


@admin.register(EscrowHold)
class EscrowHoldAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = ("id", "order", "cluster", "shown_amount", "state", "created_at", "resolved_at")
    list_filter = ("state",)
    search_fields = (
        "=order__id",
        "=cluster__id",
        "order__buyer__username",
        "cluster__buyer__username",
    )
    shown_amount = money("amount", "amount")
    readable = {"amount": "shown_amount"}


@admin.register(AuditRun)
class AuditRunAdmin(ReadOnlyAdmin):
    list_display = (
        "at",
        "ok",
        "violation_count",
        "transaction_count",
        "entry_count",
        "duration_ms",
        "source",
    )
    list_filter = ("ok", "source")
    date_hierarchy = "at"
