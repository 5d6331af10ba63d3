"""What every page of the market's admin shares: amounts shown in USD, read-only model pages, and
the confirmation page of an action that takes a form."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.template.response import TemplateResponse

from marketplace.money import MAX_PAYMENT, format_usd, micro_to_usd

User = get_user_model()
# Form amounts are dollars, up to the largest single payment.
MAX_FORM_USD = micro_to_usd(MAX_PAYMENT)


def usd(micro: int | None) -> str:
    """`$2.49`, `$0.005`: marketplace.money's format, the site pages' too; blank for None."""
    return "" if micro is None else format_usd(micro)


def money(field: str, description: str):
    """A list_display column showing the micro-USD `field` in USD."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        return usd(getattr(obj, field))

    return column


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
