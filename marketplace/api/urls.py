from django.urls import path
from rest_framework.routers import SimpleRouter

from marketplace.api import ssh_key_views, token_views, views

router = SimpleRouter()
router.register("listings", views.ListingViewSet, basename="listing")
router.register("orders", views.OrderViewSet, basename="order")
router.register("payouts", views.PayoutViewSet, basename="payout")
router.register("auth/tokens", token_views.ApiTokenViewSet, basename="api-token")
router.register("ssh-keys", ssh_key_views.SshKeyViewSet, basename="ssh-key")

urlpatterns = [
    path("auth/token/", token_views.ApiTokenView.as_view(), name="auth-token"),
    path("wallet/", views.WalletView.as_view(), name="wallet"),
    path("wallet/top-ups/", views.TopUpView.as_view(), name="wallet-top-up"),
    # No trailing slash: the URL names the file it downloads.
    path(
        "orders/<int:pk>/wireguard.conf",
        views.OrderViewSet.as_view({"get": "wireguard_conf"}, detail=True, basename="order"),
        name="order-wireguard-conf",
    ),
    *router.urls,
]
