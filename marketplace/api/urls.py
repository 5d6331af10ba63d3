from django.urls import path
from rest_framework.routers import SimpleRouter

from marketplace.api import (
    cluster_views,
    listing_views,
    order_views,
    ssh_key_views,
    token_views,
    wallet_views,
)

router = SimpleRouter()
router.register("listings", listing_views.ListingViewSet, basename="listing")
router.register("orders", order_views.OrderViewSet, basename="order")
router.register("clusters", cluster_views.ClusterViewSet, basename="cluster")
router.register("payouts", wallet_views.PayoutViewSet, basename="payout")
router.register("auth/tokens", token_views.ApiTokenViewSet, basename="api-token")
router.register("ssh-keys", ssh_key_views.SshKeyViewSet, basename="ssh-key")

urlpatterns = [
    path("auth/token/", token_views.ApiTokenView.as_view(), name="auth-token"),
    path("wallet/", wallet_views.WalletView.as_view(), name="wallet"),
    path("wallet/top-ups/", wallet_views.TopUpView.as_view(), name="wallet-top-up"),
    # No trailing slash: the URL names the file it downloads.
    path(
        "orders/<int:pk>/wireguard.conf",
        order_views.OrderViewSet.as_view({"get": "wireguard_conf"}, detail=True, basename="order"),
        name="order-wireguard-conf",
    ),
    path(
        "clusters/<int:pk>/wireguard.conf",
        cluster_views.ClusterViewSet.as_view(
            {"get": "wireguard_conf"}, detail=True, basename="cluster"
        ),
        name="cluster-wireguard-conf",
    ),
    *router.urls,
]
