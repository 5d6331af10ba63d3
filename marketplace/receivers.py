"""marketplace follows meshnet's peer hooks to move orders (meshnet never imports us)."""

from django.dispatch import receiver

from marketplace import services
from marketplace.models import Order
from meshnet.signals import peer_acknowledged, peer_removed, peer_traffic


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


@receiver(peer_traffic, dispatch_uid="marketplace.peer_traffic")
def on_peer_traffic(sender, job_peer, rx_bytes, tx_bytes, **kwargs) -> None:
    services.add_traffic(job_peer, rx_bytes=rx_bytes, tx_bytes=tx_bytes)
