"""The gateway's URLs plus /bench/floor/: a DRF view with the API's authentication and
permissions that returns 50 constant rows of a listing's shape, without touching the market:
what Django, DRF, token auth and JSON rendering cost by themselves (benchmarks/read_path.py)."""

from django.urls import include, path
from rest_framework.response import Response
from rest_framework.views import APIView

ROW = {
    "id": 1, "node": {"id": 1, "name": "node-1"}, "owner": "provider", "gpu_model": "RTX 4090",
    "vram_gb": 24, "gpu_count": 1, "gpus_available": 1, "price_per_gpu_hour": 500000,
    "price_per_gib": 10000, "region": "eu-west", "simulated": False, "is_active": True,
    "created_at": "2026-01-01T00:00:00Z", "reliability": 99, "images": ["pytorch"],
    "cpus_per_gpu": 4, "memory_gb_per_gpu": 16, "disk_gb": 50, "egress": True, "online": True,
    "last_seen_at": "2026-01-01T00:00:00Z", "driver_version": "550.54.14", "cuda_version": "12.4",
}  # fmt: skip


class Floor(APIView):
    def get(self, request):  # type: ignore[no-untyped-def]
        return Response({"next": None, "previous": None, "results": [ROW] * 50})


urlpatterns = [path("bench/floor/", Floor.as_view()), path("", include("config.urls"))]
