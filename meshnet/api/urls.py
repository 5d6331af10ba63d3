from django.urls import path
from rest_framework.routers import SimpleRouter

from meshnet.api import views

router = SimpleRouter()
router.register("nodes", views.NodeViewSet, basename="node")

urlpatterns = [
    path("enrollment-tokens/", views.EnrollmentTokenView.as_view(), name="enrollment-tokens"),
    *router.urls,
]
