from django.urls import path

from frontend import views

app_name = "frontend"
urlpatterns = [
    path("", views.marketplace, name="marketplace"),
    path("healthz/", views.healthz, name="healthz"),
]
