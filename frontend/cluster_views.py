"""The buyer's page of a multi-node order (marketplace.clusters): its parts with their nodes,
states and sandbox addresses, and the one wg-quick file for all of them (the API's
clusters/{id}/wireguard.conf, which the session authenticates). Another user's is a 404."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from frontend.account_views import buyer_login_required
from marketplace.cluster_models import Cluster
from marketplace.clusters import state_of
from marketplace.models import Order
from meshnet.models import Sandbox

S = Order.State


@buyer_login_required
@require_GET
def cluster_detail(request: HttpRequest, pk: int) -> HttpResponse:
    cluster = Cluster.objects.filter(pk=pk, buyer=request.user).first()
    if cluster is None:
        raise Http404("no such multi-node order of yours")
    parts = list(
        Order.objects.filter(cluster=cluster)
        .select_related("listing__node", "job_peer")
        .order_by("part_index")
    )
    boxes = dict(
        Sandbox.objects.filter(ref__in=[f"order:{p.pk}" for p in parts]).values_list(
            "ref", "address"
        )
    )
    live = [p for p in parts if p.state in (S.PROVISIONING, S.RUNNING) and p.job_peer_id]
    context = {
        "cluster": cluster,
        "state": state_of(cluster, parts),
        "parts": [(part, boxes.get(f"order:{part.pk}")) for part in parts],
        # The one tunnel address every node routes (the parts' peers share it).
        "tunnel_address": live[0].job_peer.address if live else None,
    }
    return render(request, "frontend/cluster.html", context)
