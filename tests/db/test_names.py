"""Sandbox names on the gateway (meshnet.names, docs/names.md): the signed names table each node
gets with its desired state names every order's sandboxes for that order's members only, the
agent says whether it runs the responder, and the buyer's wg-quick file points at it. The
table is checked by the agent's own code: its signature with the pinned gateway key, and the
answers clawnode.names gives from it."""

from __future__ import annotations

import configparser
import socket

import dns.message
import dns.rcode
import pytest
from clawnode import names, wire
from clawnode.keys import Identity

from config.celery import app as celery_app
from marketplace.orders import place_order, provision_order, stop_order
from meshnet.agent_channel import AgentRefused
from meshnet.gateway_key import gateway_identity
from meshnet.models import Node, Sandbox
from meshnet.names import group_of, name_table, sandbox_name, signed_names
from meshnet.nodes import update_inventory
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]


@pytest.fixture(autouse=True)
def eager(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def node(provider):
    from marketplace.demo_data import enrol_node

    node, _ = enrol_node(
        provider,
        hostname=socket.gethostname(),
        gpus=[factories.gpu(i) for i in range(4)],
        observed_ip="203.0.113.10",
    )
    return node


@pytest.fixture
def listing(provider, node):
    return factories.sandbox_listing(provider, node, gpu_count=4)


@pytest.fixture
def keyed_buyer(funded_buyer):
    factories.ssh_key(funded_buyer, name="laptop")
    return funded_buyer


def provisioned(buyer, listing):
    order = place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=1,
        hours=2,
        wireguard_public_key=factories.wg_public_key(),
    )
    provision_order(order.pk)
    order.refresh_from_db()
    return order, Sandbox.objects.get(ref=f"order:{order.pk}")


def responder_index(node: Node) -> names.NameIndex:
    """What the node's agent would answer from: the signed table, verified with the gateway's
    public key as the agent pins it."""
    envelope = signed_names(Node.objects.get(pk=node.pk))
    body = wire.open_envelope(envelope, gateway_identity().public_key, wire.NAMES)
    table = wire.NameTable.from_dict(body)
    assert table.node_id == node.node_id
    return names.index_of(table.groups)


def ask(index, source: str, name: str) -> dns.message.Message:
    reply, _ = names.answer(index, source, dns.message.make_query(name, "A").to_wire())
    return dns.message.from_wire(reply)


def test_a_sandbox_is_named_after_its_order_and_part():
    assert sandbox_name("order:17") == "order-17-0.molt"
    assert sandbox_name("order:17:2") == "order-17-2.molt"  # a multi-node order's part 2
    assert group_of("order:17:2") == ("order:17", 2)
    assert sandbox_name("hub") is None and sandbox_name("order:x") is None


def test_the_nodes_table_names_its_orders_sandbox_for_the_sandbox_and_the_buyer(
    keyed_buyer, node, listing
):
    order, sandbox = provisioned(keyed_buyer, listing)
    table = name_table(Node.objects.get(pk=node.pk))
    assert table.revision == Node.objects.get(pk=node.pk).desired_revision
    (group,) = table.groups
    assert group.ref == f"order:{order.pk}"
    assert set(group.clients) == {sandbox.address, sandbox.peer_address}
    assert group.records == (
        wire.NameRecord(name=f"order-{order.pk}-0.molt", address=sandbox.address),
    )
    index = responder_index(node)
    for source in (sandbox.address, sandbox.peer_address):
        reply = ask(index, source, f"order-{order.pk}-0.molt")
        assert [item.address for rrset in reply.answer for item in rrset] == [sandbox.address]


def test_one_orders_members_cannot_resolve_anothers_sandbox(keyed_buyer, node, listing):
    _first, first_box = provisioned(keyed_buyer, listing)
    second, second_box = provisioned(keyed_buyer, listing)
    index = responder_index(node)
    foreign = ask(index, first_box.peer_address, f"order-{second.pk}-0.molt")
    missing = ask(index, first_box.peer_address, "order-999999-0.molt")
    assert foreign.rcode() == missing.rcode() == dns.rcode.NXDOMAIN
    assert not foreign.answer and not missing.answer
    assert ask(index, second_box.address, f"order-{second.pk}-0.molt").answer


def test_a_stopped_orders_name_leaves_the_table(keyed_buyer, node, listing):
    order, sandbox = provisioned(keyed_buyer, listing)
    stop_order(order)
    assert name_table(Node.objects.get(pk=node.pk)).groups == ()
    reply = ask(responder_index(node), sandbox.peer_address, f"order-{order.pk}-0.molt")
    assert reply.rcode() == dns.rcode.REFUSED  # not a client of anything any more


def test_the_inventory_says_whether_the_agent_runs_the_responder(node):
    assert Node.objects.get(pk=node.pk).names_responder is False
    update_inventory(node, [], names=True)
    assert Node.objects.get(pk=node.pk).names_responder is True
    update_inventory(node, [], names=None)  # an agent that predates names
    assert Node.objects.get(pk=node.pk).names_responder is False
    with pytest.raises(AgentRefused, match="names"):
        update_inventory(node, [], names="yes")


def parse_wg_quick(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(strict=True, inline_comment_prefixes=None)
    parser.optionxform = str
    parser.read_string(text)
    return {section: dict(parser[section]) for section in parser.sections()}


def test_the_buyers_config_uses_the_responder_only_where_the_agent_runs_one(
    api_client_for, keyed_buyer, node, listing
):
    order, sandbox = provisioned(keyed_buyer, listing)
    client = api_client_for(keyed_buyer)
    url = f"/api/v1/orders/{order.pk}/wireguard.conf"

    without = parse_wg_quick(client.get(url).content.decode())
    assert "DNS" not in without["Interface"]
    assert without["Peer"]["AllowedIPs"] == f"{sandbox.address}/32"

    update_inventory(node, [], names=True)
    # By default the DNS line is there to uncomment: an active one makes wg-quick up fail
    # outright on a machine without resolvconf.
    text = client.get(url).content.decode()
    config = parse_wg_quick(text)
    assert "DNS" not in config["Interface"]
    assert f"\n# DNS = {node.mesh_address}, molt\n" in text
    assert config["Peer"]["AllowedIPs"] == f"{sandbox.address}/32, {node.mesh_address}/32"
    assert f"ssh root@order-{order.pk}-0" in text
    active = parse_wg_quick(client.get(url, {"dns": "on"}).content.decode())
    assert active["Interface"]["DNS"] == f"{node.mesh_address}, molt"
    assert active["Peer"]["AllowedIPs"] == config["Peer"]["AllowedIPs"]


def test_a_names_table_is_refused_by_the_agent_when_not_signed_by_the_gateway(node):
    envelope = signed_names(node)
    forged = wire.signed_envelope(wire.NAMES, envelope["body"], Identity.generate())
    responder = names.NamesResponder([], upstreams=())
    refused = names.apply_envelope(
        responder,
        forged,
        gateway_key=gateway_identity().public_key,
        node_id=node.node_id,
        desired=None,
    )
    assert refused.startswith("refused a names table")
