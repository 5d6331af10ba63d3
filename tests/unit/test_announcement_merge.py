"""Group sends that wait together on a web process's event loop go out merged
(meshnet.channel_layer.merged): those that differ only in their merge key as one message
listing its values, every other message as it was."""

from __future__ import annotations

from meshnet.channel_layer import merged

LAYER, OTHER_LAYER = object(), object()


def changed(node: int, change: str = "online") -> dict:
    return {"type": "node.changed", "node": node, "change": change}


def test_changes_of_one_kind_to_one_group_go_as_one_message_listing_each_node_once():
    batch = [
        (LAYER, "owner.1", changed(5), "node"),
        (LAYER, "owner.1", changed(3), "node"),
        (LAYER, "owner.1", changed(5), "node"),
        (LAYER, "owner.1", changed(7), "node"),
    ]
    assert merged(batch) == [
        (LAYER, "owner.1", {"type": "node.changed", "change": "online", "nodes": [5, 3, 7]})
    ]


def test_other_groups_kinds_and_layers_stay_apart_and_a_lone_message_keeps_its_form():
    batch = [
        (LAYER, "owner.1", changed(5), "node"),
        (LAYER, "owner.2", changed(6), "node"),
        (LAYER, "owner.1", changed(5, "inventory"), "node"),
        (OTHER_LAYER, "owner.1", changed(8), "node"),
        (LAYER, "owner.1", changed(9), "node"),
    ]
    assert merged(batch) == [
        (LAYER, "owner.1", {"type": "node.changed", "change": "online", "nodes": [5, 9]}),
        (LAYER, "owner.2", changed(6)),
        (LAYER, "owner.1", changed(5, "inventory")),
        (OTHER_LAYER, "owner.1", changed(8)),
    ]


def test_without_a_merge_key_every_message_goes_as_it_is_equal_ones_too():
    order = {"type": "order.changed", "order": 4}
    batch = [
        (LAYER, "order.4", order, ""),
        (LAYER, "order.4", dict(order), ""),
        (LAYER, "order.5", {"type": "order.changed", "order": 5}, ""),
        (LAYER, "node.abc", {"type": "node.revoked"}, ""),
    ]
    assert merged(batch) == [
        (LAYER, "order.4", order),
        (LAYER, "order.4", order),
        (LAYER, "order.5", {"type": "order.changed", "order": 5}),
        (LAYER, "node.abc", {"type": "node.revoked"}),
    ]
