from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from frontend.account_views import ThrottledAdminAuthenticationForm

# The admin's log-in checks passwords too: behind the same guard as the site's form.
admin.site.login_form = ThrottledAdminAuthenticationForm
# The operators' console, named as such rather than "Django administration".
admin.site.site_header = "MOLT operations"
admin.site.site_title = "MOLT operations"
admin.site.index_title = "Users, nodes, orders and money"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/", include("meshnet.api.urls")),
    path("api/v1/", include("marketplace.api.urls")),
    path("", include("frontend.urls")),
]
