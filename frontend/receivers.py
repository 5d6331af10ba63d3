"""Order pages follow metered traffic too: their usage figures and chart refresh live.

State changes are announced by marketplace.lifecycle itself (every transition); traffic is a
meshnet signal, so this app listens and uses the same announcement."""

from django.dispatch import receiver

from marketplace.announce import announce_order
from marketplace.models import Order
from meshnet.signals import peer_acknowledged, peer_traffic


@receiver(peer_traffic, dispatch_uid="frontend.peer_traffic")
def on_peer_traffic(sender, job_peer, **kwargs) -> None:
    order_id = Order.objects.filter(job_peer=job_peer).values_list("pk", flat=True).first()
    if order_id is not None:
        announce_order(order_id)


@receiver(peer_acknowledged, dispatch_uid="frontend.peer_acknowledged")
def on_peer_acknowledged(sender, job_peer, **kwargs) -> None:
    # After a re-key the order stays running, so no transition announces that the node now has
    # the new key; the page shows it from this.
    order_id = Order.objects.filter(job_peer=job_peer).values_list("pk", flat=True).first()
    if order_id is not None:
        announce_order(order_id)
