"""marketplace follows meshnet's peer and sandbox hooks to move orders (meshnet never imports
us), and its own order_placed to enqueue provisioning (marketplace.orders never imports the
tasks)."""

from django.dispatch import receiver

from marketplace import orders, tasks
from marketplace.models import Order
from marketplace.signals import cluster_part_lost, order_placed
from meshnet.enqueue import enqueue_on_commit
from meshnet.signals import (
    node_revoked,
    peer_acknowledged,
    peer_removed,
    peer_traffic,
    sandbox_changed,
)


@receiver(order_placed, dispatch_uid="marketplace.order_placed")
def on_order_placed(sender, order, **kwargs) -> None:
    # On commit: a worker must not look for an order its transaction has not committed yet.
    enqueue_on_commit(tasks.provision_order, order.pk, swept_by="the reprovision-pending beat task")


@receiver(peer_acknowledged, dispatch_uid="marketplace.peer_acknowledged")
def on_peer_acknowledged(sender, job_peer, at, **kwargs) -> None:
    # Running only once the sandbox, if any, is ready too: start_when_ready decides.
    order = Order.objects.filter(job_peer=job_peer).first()
    if order is not None:
        orders.start_when_ready(order)


@receiver(sandbox_changed, dispatch_uid="marketplace.sandbox_changed")
def on_sandbox_changed(sender, sandbox, **kwargs) -> None:
    # After the report committed, in a transaction of its own: ready may start the order (if
    # its peer is acknowledged), failed before running fails it with the hold released, and
    # failed while running ends it billed up to the report.
    order = Order.objects.filter(job_peer__ref=sandbox.ref).first()
    if order is not None and not orders.start_when_ready(order):
        orders.end_if_sandbox_died(order)


@receiver(peer_removed, dispatch_uid="marketplace.peer_removed")
def on_peer_removed(sender, job_peer, at, **kwargs) -> None:
    order = Order.objects.filter(job_peer=job_peer).first()
    if order is not None:
        orders.complete_order(order, at)


@receiver(peer_traffic, dispatch_uid="marketplace.peer_traffic")
def on_peer_traffic(sender, job_peer, rx_bytes, tx_bytes, **kwargs) -> None:
    orders.add_traffic(job_peer, rx_bytes=rx_bytes, tx_bytes=tx_bytes)
    # The hold covers the bandwidth allowance and no more: reaching it stops the job.
    orders.stop_if_allowance_used(job_peer)


@receiver(node_revoked, dispatch_uid="marketplace.node_revoked")
def on_node_revoked(sender, node, reason, **kwargs) -> None:
    # Each order in its own transaction: one that fails to end does not keep the others live,
    # and revoke_node can be called again to retry it.
    for order in Order.objects.live().filter(listing__node=node).only("pk"):
        orders.fail_order(order, f"provider node revoked: {reason}"[:200])


@receiver(cluster_part_lost, dispatch_uid="marketplace.cluster_part_lost")
def on_cluster_part_lost(sender, cluster_id, **kwargs) -> None:
    # After commit, in transactions of their own: the failed part's transaction holds its
    # node's row, and stopping the others takes theirs (node rows in key order, never nested).
    enqueue_on_commit(
        tasks.end_cluster_after_loss, cluster_id, swept_by="the expire-orders beat task"
    )
