from django.urls import path
from rest_framework.routers import SimpleRouter

from meshnet.api import relay_views, views

router = SimpleRouter()
router.register("nodes", views.NodeViewSet, basename="node")

urlpatterns = [
    path("enrollment-tokens/", views.EnrollmentTokenView.as_view(), name="enrollment-tokens"),
    path("relay/pairs/", relay_views.RelayPairsView.as_view(), name="relay-pairs"),
    *router.urls,
]
