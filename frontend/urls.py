from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from frontend import (
    account_views,
    buyer_views,
    card_views,
    cluster_views,
    install,
    ops_views,
    provider_views,
    staff_otp,
    views,
)


class FaviconRedirect(RedirectView):
    """Pages without a <link rel="icon"> (the admin's) make browsers guess /favicon.ico. The
    icon's address is looked up per request: with the manifest storage it exists only after
    collectstatic, which an import-time lookup would require of every `manage.py` command."""

    permanent = True

    def get_redirect_url(self, *args, **kwargs) -> str:
        return static("frontend/favicon.svg")


app_name = "frontend"
urlpatterns = [
    path("", views.marketplace, name="marketplace"),
    path("healthz/", views.healthz, name="healthz"),
    path("readyz/", views.readyz, name="readyz"),
    # Pages without a <link rel="icon"> (the admin's) make browsers guess /favicon.ico.
    path("favicon.ico", FaviconRedirect.as_view(), name="favicon"),
    # Buyers
    path("listings/<int:pk>/", buyer_views.listing_detail, name="listing"),
    path("orders/", buyer_views.order_list, name="orders"),
    path("orders/<int:pk>/", buyer_views.order_detail, name="order"),
    path("orders/<int:pk>/panels/", buyer_views.order_panels, name="order_panels"),
    path("clusters/<int:pk>/", cluster_views.cluster_detail, name="cluster"),
    path("wallet/", buyer_views.wallet, name="wallet"),
    path("wallet/card/", buyer_views.card_top_up, name="card_top_up"),
    path("wallet/card/<int:pk>/", card_views.card_top_up_status, name="card_top_up_status"),
    # Accounts
    path("accounts/signup/", account_views.signup, name="signup"),
    path("accounts/login/", account_views.login_view, name="login"),
    path("accounts/staff-otp/", staff_otp.enrol, name="staff_otp"),
    path("accounts/logout/", account_views.logout_view, name="logout"),
    path("accounts/password/", account_views.password_change, name="password_change"),
    path(
        "accounts/password/done/",
        account_views.password_change_done,
        name="password_change_done",
    ),
    path("accounts/tokens/", account_views.api_tokens, name="api_tokens"),
    path(
        "accounts/tokens/<int:token_id>/revoke/",
        account_views.revoke_api_token,
        name="revoke_api_token",
    ),
    path("accounts/ssh-keys/", account_views.ssh_keys, name="ssh_keys"),
    path(
        "accounts/ssh-keys/<int:key_id>/delete/",
        account_views.delete_ssh_key,
        name="delete_ssh_key",
    ),
    # Providers (frontend.provider_views)
    path(
        "provider/", RedirectView.as_view(pattern_name="frontend:provider_nodes"), name="provider"
    ),
    path("provider/nodes/", provider_views.nodes, name="provider_nodes"),
    path("provider/nodes/token/", provider_views.create_token, name="provider_token"),
    path("provider/nodes/cards/", provider_views.node_cards, name="provider_node_cards"),
    path("provider/nodes/<int:pk>/", provider_views.node_detail, name="provider_node"),
    path("provider/nodes/<int:pk>/card/", provider_views.node_card, name="provider_node_card"),
    path("provider/listings/", provider_views.listings, name="provider_listings"),
    path("provider/listings/<int:pk>/", provider_views.listing_edit, name="provider_listing_edit"),
    path(
        "provider/listings/<int:pk>/pause/",
        provider_views.listing_set_active,
        {"active": False},
        name="provider_listing_pause",
    ),
    path(
        "provider/listings/<int:pk>/resume/",
        provider_views.listing_set_active,
        {"active": True},
        name="provider_listing_resume",
    ),
    path(
        "provider/listings/<int:pk>/delete/",
        provider_views.listing_delete,
        name="provider_listing_delete",
    ),
    path("provider/earnings/", provider_views.earnings, name="provider_earnings"),
    path("provider/earnings/payout/", provider_views.request_payout, name="provider_payout"),
    # The install line and the agent package it installs (frontend.install)
    path("install.sh", install.install_script, name="install_script"),
    path("agent/", install.agent_index, name="agent_index"),
    path("agent/<str:filename>", install.agent_package, name="agent_package"),
    # Operators (frontend.ops_views)
    path("ops/", ops_views.dashboard, name="ops"),
]
