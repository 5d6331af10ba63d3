"""The market in the Django admin.

Money and lifecycle rows are read-only here: the ledger is append-only and every balance is a
cache of its entries, and an order moves only through marketplace.lifecycle. Operators act
through actions that call the write paths: grant credits (on users), pause or resume listings, stop
orders. Amounts are integers of micro-USD and shown in USD.
"""

from __future__ import annotations

import secrets
from decimal import Decimal

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import OuterRef, Subquery
from django.template.response import TemplateResponse

from marketplace import idempotency, ledger, payments
from marketplace.errors import MarketError
from marketplace.listings import update_listing
from marketplace.models import (
    Account,
    ApiToken,
    AuditRun,
    Dispute,
    EarningsHold,
    EscrowHold,
    IdempotencyRecord,
    LedgerEntry,
    LedgerTransaction,
    Listing,
    NodeReliability,
    Order,
    OrderTransition,
    PayoutRequest,
    Settlement,
)
from marketplace.money import MAX_PAYMENT, format_usd, micro_to_usd, usd_to_micro
from marketplace.orders import stop_order

User = get_user_model()
# Form amounts are dollars, up to the largest single payment.
MAX_FORM_USD = micro_to_usd(MAX_PAYMENT)


def usd(micro: int | None) -> str:
    """`$2.49`, `$0.005`: marketplace.money's format, the site pages' too; blank for None."""
    return "" if micro is None else format_usd(micro)


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only: these rows are written by services (the ledger's by its triggers' leave)."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def money(field: str, description: str):
    """A list_display column showing the micro-USD `field` in USD."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        return usd(getattr(obj, field))

    return column


# --- users: grant credits -------------------------------------------------------------------------


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
            what=f"granted {amount} micro-USD to users {ids}: {memo}",
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


class DeletedFilter(admin.SimpleListFilter):
    title = "deleted"
    parameter_name = "deleted"

    def lookups(self, request, model_admin):
        return [("no", "not deleted"), ("yes", "deleted")]

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(deleted_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(deleted_at__isnull=False)
        return queryset


@admin.register(Listing)
class ListingAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "gpu_model",
        "gpu_count",
        "price",
        "gib_price",
        "region",
        "node",
        "owner",
        "is_active",
        "simulated",
        "deleted_at",
    )
    list_filter = ("is_active", DeletedFilter, "simulated", "region", "gpu_model")
    list_select_related = ("node", "owner")
    search_fields = ("=id", "gpu_model", "node__name", "owner__username")
    actions = ["pause", "resume"]
    price = money("price_per_gpu_hour", "per GPU-hour")
    gib_price = money("price_per_gib", "per GiB")

    def has_pause_permission(self, request) -> bool:
        return request.user.has_perm("marketplace.change_listing")

    def _set_active(self, request, queryset, active: bool) -> None:
        changed = 0
        for listing in queryset.filter(deleted_at__isnull=True):
            try:
                update_listing(listing, is_active=active)
                changed += 1
            except MarketError as exc:
                self.message_user(request, f"#{listing.pk}: {exc}", messages.ERROR)
        self.message_user(request, f"{'Resumed' if active else 'Paused'} {changed} listing(s).")

    @admin.action(description="Pause selected listings (no new orders)", permissions=["pause"])
    def pause(self, request, queryset):
        self._set_active(request, queryset, False)

    @admin.action(description="Resume selected listings", permissions=["pause"])
    def resume(self, request, queryset):
        self._set_active(request, queryset, True)


class TransitionInline(admin.TabularInline):
    model = OrderTransition
    extra = 0
    can_delete = False
    readonly_fields = ("from_state", "to_state", "reason", "created_at")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Order)
class OrderAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "buyer",
        "listing",
        "node",
        "gpu_count",
        "hours",
        "state",
        "hold",
        "bytes_in",
        "bytes_out",
        "created_at",
        "ended_at",
        "reason",
    )
    list_filter = ("state",)
    list_select_related = ("buyer", "listing__node")
    search_fields = ("=id", "buyer__username", "wireguard_public_key", "listing__node__name")
    date_hierarchy = "created_at"
    inlines = [TransitionInline]
    actions = ["stop"]
    hold = money("hold_amount", "hold")

    @admin.display(description="node", ordering="listing__node__name")
    def node(self, order: Order) -> str:
        return order.listing.node.name

    def has_stop_permission(self, request) -> bool:
        return request.user.has_perm("marketplace.change_order")

    @admin.action(description="Stop selected orders", permissions=["stop"])
    def stop(self, request, queryset):
        stopped = 0
        for order in queryset:
            try:
                stop_order(order, reason=f"stopped by operator {request.user}")
                stopped += 1
            except MarketError as exc:
                self.message_user(request, f"order {order.pk}: {exc}", messages.WARNING)
        self.message_user(request, f"Stopped {stopped} order(s).")


@admin.register(OrderTransition)
class OrderTransitionAdmin(ReadOnlyAdmin):
    list_display = ("order", "from_state", "to_state", "reason", "created_at")
    list_filter = ("to_state",)
    search_fields = ("=order__id", "reason")
    date_hierarchy = "created_at"


# --- the ledger ----------------------------------------------------------------------------------


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "user", "shown_balance", "created_at")
    list_filter = ("kind",)
    list_select_related = ("user",)
    search_fields = ("=id", "user__username")
    shown_balance = money("balance", "balance")


class EntryInline(admin.TabularInline):
    model = LedgerEntry
    extra = 0
    can_delete = False
    readonly_fields = ("account", "amount")

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
        return _action_page(
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
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ("id", "transaction", "account", "shown_amount")
    list_filter = ("account__kind", "transaction__kind")
    list_select_related = ("transaction", "account__user")
    search_fields = ("=transaction__id", "account__user__username")
    shown_amount = money("amount", "amount")


@admin.register(EscrowHold)
class EscrowHoldAdmin(ReadOnlyAdmin):
    list_display = ("id", "order", "shown_amount", "state", "created_at", "resolved_at")
    list_filter = ("state",)
    search_fields = ("=order__id", "order__buyer__username")
    shown_amount = money("amount", "amount")


@admin.register(Settlement)
class SettlementAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "order",
        "billed_seconds",
        "time",
        "bandwidth_bytes",
        "bandwidth",
        "captured_usd",
        "fee_usd",
        "provider_usd",
        "released_usd",
        "created_at",
    )
    search_fields = ("=order__id", "order__buyer__username", "order__listing__owner__username")
    date_hierarchy = "created_at"
    time = money("time_charge", "time")
    bandwidth = money("bandwidth_charge", "bandwidth")
    captured_usd = money("captured", "captured")
    fee_usd = money("fee", "fee")
    provider_usd = money("provider_amount", "provider")
    released_usd = money("released", "released")


# --- API access -----------------------------------------------------------------------------------


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


@admin.register(EarningsHold)
class EarningsHoldAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "order",
        "provider",
        "shown_amount",
        "state",
        "created_at",
        "release_after",
        "resolved_at",
    )
    list_filter = ("state",)
    list_select_related = ("provider",)
    search_fields = ("=order__id", "provider__username")
    shown_amount = money("amount", "amount")


def _action_page(model_admin, request, *, title, intro, items, form, action, selected, submit):
    """The intermediate page of an operator action that needs input (see action_form.html)."""
    opts = model_admin.model._meta
    return TemplateResponse(
        request,
        "marketplace/admin/action_form.html",
        {
            **model_admin.admin_site.each_context(request),
            "title": title,
            "intro": intro,
            "items": items,
            "opts": opts,
            "form": form,
            "action": action,
            "selected": selected,
            "submit_label": submit,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "changelist_url": f"admin:{opts.app_label}_{opts.model_name}_changelist",
        },
    )


class ResolveDisputeForm(forms.Form):
    refund = forms.DecimalField(
        label="Refund to the buyer, USD",
        min_value=Decimal(0),
        max_value=MAX_FORM_USD,
        max_digits=13,
        decimal_places=6,
        help_text="0 up to what was captured: first out of the provider's frozen share, "
        "beyond it out of the platform fee; the rest of the share goes to the provider.",
    )
    note = forms.CharField(max_length=500, required=False, label="Note (shown to the buyer)")


@admin.register(Dispute)
class DisputeAdmin(ReadOnlyAdmin):
    list_display = ("id", "order", "buyer", "state", "opened_at", "resolved_at", "refund_usd")
    list_filter = ("state",)
    list_select_related = ("buyer",)
    search_fields = ("=order__id", "buyer__username", "reason")
    date_hierarchy = "opened_at"
    refund_usd = money("refund", "refund")
    readonly_fields = ("reason",)
    actions = ["resolve"]

    def has_resolve_permission(self, request) -> bool:
        return request.user.has_perm("marketplace.change_dispute")

    @admin.action(
        description="Resolve the selected dispute (refund an amount)", permissions=["resolve"]
    )
    def resolve(self, request, queryset):
        """An intermediate page asks for the refund; submitting it calls
        payments.resolve_dispute (once: a second submission is refused, moving nothing)."""
        disputes = list(
            queryset.filter(state=Dispute.State.OPEN).select_related(
                "order__settlement", "order__earnings_hold", "buyer"
            )
        )
        if len(disputes) != 1:
            self.message_user(request, "Select exactly one open dispute.", messages.ERROR)
            return None
        dispute = disputes[0]
        if "apply" in request.POST:
            form = ResolveDisputeForm(request.POST)
            if form.is_valid():
                refund = usd_to_micro(form.cleaned_data["refund"])
                try:
                    payments.resolve_dispute(
                        dispute,
                        refund=refund,
                        operator=request.user,
                        note=form.cleaned_data["note"],
                    )
                except MarketError as exc:
                    form.add_error("refund", str(exc))
                else:
                    self.message_user(
                        request, f"Dispute of order {dispute.order_id}: refunded {usd(refund)}."
                    )
                    return None
        else:
            form = ResolveDisputeForm(initial={"refund": 0})
        settlement = dispute.order.settlement
        return _action_page(
            self,
            request,
            title=f"Resolve the dispute of order {dispute.order_id}",
            intro=f"{dispute.buyer} says: {dispute.reason}",
            items=[
                f"captured {usd(settlement.captured)}: provider share "
                f"{usd(settlement.provider_amount)} (frozen), platform fee {usd(settlement.fee)}",
                f"billed {settlement.billed_seconds} s, offline {settlement.offline_seconds} s, "
                f"{settlement.bandwidth_bytes} bytes",
            ],
            form=form,
            action="resolve",
            selected=[dispute.pk],
            submit="Resolve",
        )


class PaymentReferenceForm(forms.Form):
    text = forms.CharField(max_length=200, required=False, label="Payment reference")


class RejectPayoutForm(forms.Form):
    text = forms.CharField(max_length=200, label="Why it is rejected")


@admin.register(PayoutRequest)
class PayoutRequestAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "provider",
        "shown_amount",
        "state",
        "requested_at",
        "decided_at",
        "decided_by",
        "note",
    )
    list_filter = ("state",)
    list_select_related = ("provider", "decided_by")
    search_fields = ("=id", "provider__username", "note")
    date_hierarchy = "requested_at"
    shown_amount = money("amount", "amount")
    actions = ["mark_paid", "reject"]

    def has_decide_permission(self, request) -> bool:
        return request.user.has_perm("marketplace.change_payoutrequest")

    def _decide(self, request, queryset, *, paid: bool):
        """An intermediate page asks for the payment reference (paid) or the reason (reject);
        each selected request is then decided once through marketplace.payments."""
        payouts = list(queryset.filter(state=PayoutRequest.State.REQUESTED).order_by("pk"))
        if not payouts:
            self.message_user(request, "Select payout requests still requested.", messages.ERROR)
            return None
        form_class = PaymentReferenceForm if paid else RejectPayoutForm
        if "apply" in request.POST:
            form = form_class(request.POST)
            if form.is_valid():
                text = form.cleaned_data["text"]
                done = 0
                for payout in payouts:
                    try:
                        if paid:
                            payments.mark_payout_paid(payout, operator=request.user, reference=text)
                        else:
                            payments.reject_payout(payout, operator=request.user, reason=text)
                        done += 1
                    except MarketError as exc:
                        self.message_user(request, f"payout {payout.pk}: {exc}", messages.WARNING)
                verb = "Marked paid" if paid else "Rejected"
                self.message_user(request, f"{verb} {done} payout request(s).")
                return None
        else:
            form = form_class()
        total = sum(payout.amount for payout in payouts)
        return _action_page(
            self,
            request,
            title="Mark payouts paid" if paid else "Reject payouts",
            intro=(
                f"Paid outside the platform: {usd(total)} leaves the ledger to the outside world."
                if paid
                else f"{usd(total)} goes back to the providers' earnings."
            ),
            items=[f"#{p.pk} {p.provider}: {usd(p.amount)}" for p in payouts],
            form=form,
            action="mark_paid" if paid else "reject",
            selected=[p.pk for p in payouts],
            submit="Mark paid" if paid else "Reject",
        )

    @admin.action(description="Mark selected payouts paid", permissions=["decide"])
    def mark_paid(self, request, queryset):
        return self._decide(request, queryset, paid=True)

    @admin.action(description="Reject selected payouts", permissions=["decide"])
    def reject(self, request, queryset):
        return self._decide(request, queryset, paid=False)


@admin.register(NodeReliability)
class NodeReliabilityAdmin(ReadOnlyAdmin):
    list_display = ("node", "score", "jobs_completed", "jobs_failed", "uptime_bp", "updated_at")
    list_select_related = ("node",)
    search_fields = ("node__name",)


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
