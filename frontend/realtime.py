"""Realtime for the browser pages: the one owner of their Channels group names and of what is
sent to them.

The apps below emit domain signals inside their writing transactions and know nothing of pages:
meshnet.signals.node_changed (a node enrolled, online, with new inventory, revoked),
meshnet.signals.sandbox_changed (a job's sandbox pulling, ready, failed, removed),
marketplace.signals.order_changed (an order's state or key), and meshnet's peer_traffic and
peer_acknowledged (an order's usage, a re-key acknowledged while it stays running). The
receivers here turn them into group sends after the transaction commits
(meshnet.channel_layer.group_send_on_commit): a change that rolls back announces nothing.

Messages name what changed and nothing more: the page's consumer (frontend.consumers,
frontend.provider_consumers) re-checks who is logged in and re-reads what it shows.
Connected in FrontendConfig.ready().
"""

from __future__ import annotations

from django.dispatch import receiver

from marketplace.models import Order
from marketplace.signals import order_changed
from meshnet.channel_layer import group_send_on_commit
from meshnet.models import JobPeer, Node, Sandbox
from meshnet.signals import node_changed, peer_acknowledged, peer_traffic, sandbox_changed


def order_group(order_id: int) -> str:
    """The group of one order's open pages (frontend.consumers.OrderConsumer)."""
    return f"order.{order_id}"


def owner_group(user_id: int) -> str:
    """The group of one provider's open nodes pages (frontend.provider_consumers)."""
    return f"owner.{user_id}"


def announce_order(order_id: int) -> None:
    """After commit, tell the order's open pages that it changed. Only the id: each page's
    consumer re-reads the order and re-checks its buyer before sending anything."""
    group_send_on_commit(order_group(order_id), {"type": "order.changed", "order": order_id})


def _announce_order_of(job_peer: JobPeer) -> None:
    order_id = Order.objects.filter(job_peer=job_peer).values_list("pk", flat=True).first()
    if order_id is not None:
        announce_order(order_id)


@receiver(order_changed, dispatch_uid="frontend.realtime.order_changed")
def on_order_changed(sender, order_id: int, **kwargs) -> None:
    announce_order(order_id)


@receiver(peer_traffic, dispatch_uid="frontend.realtime.peer_traffic")
def on_peer_traffic(sender, job_peer: JobPeer, **kwargs) -> None:
    # Order pages follow metered traffic: their usage figures and chart refresh live.
    _announce_order_of(job_peer)


@receiver(peer_acknowledged, dispatch_uid="frontend.realtime.peer_acknowledged")
def on_peer_acknowledged(sender, job_peer: JobPeer, **kwargs) -> None:
    # After a re-key the order stays running, so no transition announces that the node now has
    # the new key; the page shows it from this.
    _announce_order_of(job_peer)


@receiver(node_changed, dispatch_uid="frontend.realtime.node_changed")
def on_node_changed(sender, node: Node, change: str, **kwargs) -> None:
    """Tell the node's owner's open pages that it changed (`change`: enrolled, online,
    inventory, revoked). The page fetches the node's card through its own authorized view."""
    group_send_on_commit(
        owner_group(node.owner_id),
        {"type": "node.changed", "node": node.pk, "change": change},
        # Many nodes' changes of one kind waiting together go as one message, "nodes".
        merge_on="node",
    )


@receiver(sandbox_changed, dispatch_uid="frontend.realtime.sandbox_changed")
def on_sandbox_changed(sender, sandbox: Sandbox, **kwargs) -> None:
    """A sandbox is named by its order ("order:<id>"): that order's page redraws its Connect
    panel; the node's owner's nodes page redraws the node's card (its running sandboxes)."""
    kind, _, order_id = sandbox.ref.partition(":")
    if kind == "order" and order_id.isdigit():
        announce_order(int(order_id))
    owner_id = Node.objects.filter(pk=sandbox.node_id).values_list("owner_id", flat=True).first()
    if owner_id is not None:
        group_send_on_commit(
            owner_group(owner_id),
            {"type": "node.changed", "node": sandbox.node_id, "change": "sandboxes"},
        )
