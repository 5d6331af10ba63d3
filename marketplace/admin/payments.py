"""Money at the edges of an order in the admin: the provider's frozen share, disputes resolved by an
operator, payout requests marked paid or rejected."""

from __future__ import annotations

from decimal import Decimal

from django import forms
from django.contrib import admin, messages

from marketplace import payments
from marketplace.admin.common import MAX_FORM_USD, ReadableFields, action_page, money, usd
from marketplace.errors import MarketError
from marketplace.models import (
    Dispute,
    EarningsHold,
    PayoutRequest,
)
from marketplace.money import usd_to_micro
from meshnet.admin import ReadOnlyAdmin
from meshnet.units import format_bytes


@admin.register(EarningsHold)
class EarningsHoldAdmin(ReadableFields, ReadOnlyAdmin):
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
    readable = {"amount": "shown_amount"}


class ResolveDisputeForm(forms.Form):
    refund = forms.DecimalField(
        label="Refund to the buyer, USD",
        min_value=Decimal(0),
        max_value=MAX_FORM_USD,
        max_digits=13,
        decimal_places=6,
        help_text="from 0 (the dispute is rejected) up to what was captured, above: first out of "
        "the provider's frozen share, beyond it out of the platform fee; the rest of the share "
        "goes to the provider.",
    )
    note = forms.CharField(max_length=500, required=False, label="Note (shown to the buyer)")


@admin.register(Dispute)
class DisputeAdmin(ReadableFields, ReadOnlyAdmin):
    list_display = ("id", "order", "buyer", "state", "opened_at", "resolved_at", "refund_usd")
    list_filter = ("state",)
    list_select_related = ("buyer",)
    search_fields = ("=order__id", "buyer__username", "reason")
    date_hierarchy = "opened_at"
    refund_usd = money("refund", "refund")
    readable = {"refund": "refund_usd"}
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
            # No pre-filled 0 (it read as a stray figure beside the field): the operator types
            # the refund, 0 to reject the dispute.
            form = ResolveDisputeForm()
        settlement = dispute.order.settlement
        return action_page(
            self,
            request,
            title=f"Resolve the dispute of order {dispute.order_id}",
            intro=f"{dispute.buyer} says: {dispute.reason}",
            items=[
                f"captured {usd(settlement.captured)}: provider share "
                f"{usd(settlement.provider_amount)} (frozen), platform fee {usd(settlement.fee)}",
                f"billed {settlement.billed_seconds} s, offline {settlement.offline_seconds} s, "
                f"{format_bytes(settlement.bandwidth_bytes)} of traffic",
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
class PayoutRequestAdmin(ReadableFields, ReadOnlyAdmin):
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
    readable = {"amount": "shown_amount"}
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
        return action_page(
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
