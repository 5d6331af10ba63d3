"""marketplace follows meshnet's peer hooks to move orders (meshnet never imports us)."""

from django.dispatch import receiver

from marketplace import services
from marketplace.models import Order
from meshnet.signals import peer_acknowledged, peer_removed


@receiver(peer_acknowledged, dispatch_uid="marketplace.peer_acknowledged")
def on_peer_acknowledged(sender, job_peer, at, **kwargs) -> None:
    order = Order.objects.filter(job_peer=job_peer).first()
    if order is not None:
        services.mark_running(order, at)


@receiver(peer_removed, dispatch_uid="marketplace.peer_removed")
def on_peer_removed(sender, job_peer, at, **kwargs) -> None:
    order = Order.objects.filter(job_peer=job_peer).first()
    if order is not None:
        services.complete_order(order, at)
