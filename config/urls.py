from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from frontend.account_views import ThrottledAdminAuthenticationForm
from frontend.staff_otp import admin_has_permission
from marketplace.api.stripe_webhook import stripe_webhook

# The admin's log-in checks passwords too: behind the same guard as the site's form.
# It also asks staff for their authenticator code (frontend/staff_otp.py), and the site refuses
# a staff session that has not given one.
admin.site.login_form = ThrottledAdminAuthenticationForm
admin.site.login_template = "admin/molt_login.html"
admin.site.has_permission = admin_has_permission
# The operators' console, named as such rather than "Django administration".
admin.site.site_header = "MOLT operations"
admin.site.site_title = "MOLT operations"
admin.site.index_title = "Users, nodes, orders and money"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view: Swagger UI's init script is a file (?script), not inline, so the page runs
    # under a Content-Security-Policy whose scripts are 'self' only (frontend/security.py).
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="api-docs"),
    # Stripe's signed Checkout events (card top-ups): outside /api/v1/, it is Stripe's API.
    path("stripe/webhook/", stripe_webhook, name="stripe-webhook"),
    path("api/v1/", include("meshnet.api.urls")),
    path("api/v1/", include("marketplace.api.urls")),
    path("", include("frontend.urls")),
]

# An unmatched /api/ path answers JSON in the API's error shape (docs/api.md, "Errors").
handler404 = "marketplace.api.errors.not_found"
