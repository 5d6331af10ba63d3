"""What every page of the market's admin shares: amounts shown in USD, read-only model pages, and
the confirmation page of an action that takes a form."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.template.response import TemplateResponse

from marketplace.money import MAX_PAYMENT, format_price, format_usd, micro_to_usd
from meshnet.units import format_bytes

User = get_user_model()
# Form amounts are dollars, up to the largest single payment.
MAX_FORM_USD = micro_to_usd(MAX_PAYMENT)


def usd(micro: int | None) -> str:
    """`$2.49`, `$1.33`: marketplace.money's amount format, the site pages' too; blank for None."""
    return "" if micro is None else format_usd(micro)


def money(field: str, description: str):
    """A column (and a view page's line) showing the amount `field` in dollars and cents."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        return usd(getattr(obj, field))

    return column


def price(field: str, description: str, unit: str):
    """A column showing the unit price `field` (per "hour" or per "gib") as the pages do."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        value = getattr(obj, field)
        return "" if value is None else format_price(value, unit)

    return column


def byte_count(field: str, description: str):
    """A column showing the byte count `field` as `103.2 MiB`, not `108123956`."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        value = getattr(obj, field)
        return "" if value is None else format_bytes(value)

    return column


class ReadableFields:
    """A mixin for view-only admins: `readable` maps a model field (an integer of the ledger's
    unit, or of bytes) to the formatted column shown in its place on the object's page, so the
    page reads `$2.49`, never the stored integer."""

    readable: dict[str, str] = {}

    def get_fields(self, request, obj=None):
        return [self.readable.get(name, name) for name in super().get_fields(request, obj)]

    def get_readonly_fields(self, request, obj=None):
        # Columns are no form fields: the form must leave them out (it shows them read-only).
        return (*super().get_readonly_fields(request, obj), *self.readable.values())


# --- users: grant credits -------------------------------------------------------------------------


def action_page(model_admin, request, *, title, intro, items, form, action, selected, submit):
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
