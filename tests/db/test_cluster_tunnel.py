"""The buyer's one tunnel to a multi-node order (marketplace.cluster_tunnel, meshnet.key_claims):
one key for the whole order, every part's node has it as the job's peer at one tunnel address,
the database refuses the key in any other job while the order lives, one wg-quick file with
one [Interface] and a [Peer] per node, and stop removes the peer from every node."""

from __future__ import annotations

import pytest
from clawnode import wire
from clawnode.job_peers import check_job_peers
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from marketplace.cluster_models import Cluster
from marketplace.clusters import PartSpec, parts_of, place_cluster, rekey_cluster, stop_cluster
from marketplace.errors import MarketError
from marketplace.models import Order
from marketplace.orders import provision_order, rekey_order
from meshnet import ipplan, relays
from meshnet.agent_channel import acknowledge_revision
from meshnet.desired_state import signed_desired_state
from meshnet.errors import PeerKeyInUse
from meshnet.gateway_key import gateway_identity
from meshnet.models import IpAllocation, JobPeer, JobPeerKey, Node, PeerKeyClaim, Relay, Sandbox
from meshnet.peers import create_job_peer
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

CLUSTERS = "/api/v1/clusters/"


@pytest.fixture
def listings(funded_buyer, provider, carol, node_a, node_b):
    factories.ssh_key(funded_buyer)
    return (
        factories.sandbox_listing(provider, node_a, gpu_count=2),
        factories.sandbox_listing(carol, node_b, gpu_count=4),
    )


@pytest.fixture
def buyer_api(api_client_for, funded_buyer):
    return api_client_for(funded_buyer)


def _place(buyer, listings, key: str, gpus=(1, 1)) -> Cluster:
    return place_cluster(
        buyer,
        parts=[PartSpec(listing.pk, n) for listing, n in zip(listings, gpus, strict=True)],
        hours=1,
        on_part_loss="degrade",
        wireguard_public_key=key,
    )


def _provisioned(cluster: Cluster) -> list[Order]:
    for part in parts_of(cluster):
        provision_order(part.pk)
    return parts_of(cluster)


def _ack(node: Node) -> None:
    node = Node.objects.get(pk=node.pk)
    acknowledge_revision(node, node.desired_revision, at=timezone.now())


def _state(node: Node) -> wire.DesiredState:
    body = wire.open_envelope(
        signed_desired_state(Node.objects.get(pk=node.pk)),
        gateway_identity().public_key,
        wire.DESIRED_STATE,
    )
    return wire.DesiredState.from_dict(body)


def _job_peers(node: Node) -> list[wire.PeerSpec]:
    return [p for p in _state(node).peers if p.kind == "job"]


def _sections(text: str) -> list[dict[str, str]]:
    """The wg-quick file as [{"": section name, key: value}], comments dropped."""
    sections: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            sections.append({"": line})
        else:
            key, _, value = line.partition(" = ")
            sections[-1][key] = value
    return sections


def test_every_parts_node_gets_the_one_key_at_one_tunnel_address(
    funded_buyer, listings, node_a, node_b
):
    key = factories.wg_public_key()
    cluster = _place(funded_buyer, listings, key)
    assert cluster.wireguard_public_key == key
    a, b = _provisioned(cluster)
    peers = [JobPeer.objects.get(pk=p.job_peer_id) for p in (a, b)]
    assert [p.node_id for p in peers] == [node_a.pk, node_b.pk]
    assert {p.public_key for p in peers} == {key}
    assert len({p.address for p in peers}) == 1
    assert {p.key_group for p in peers} == {f"cluster:{cluster.pk}"}
    # The shared address is the claim's one lease, not a lease per part.
    claim = PeerKeyClaim.objects.get(public_key=key)
    assert claim.allocation.address == peers[0].address
    assert all(p.allocation_id is None for p in peers)
    assert IpAllocation.objects.filter(purpose="job", released_at__isnull=True).count() == 1
    # Each node's signed state: the buyer's key once, routing only the one tunnel address (the
    # agent's pool check, clawnode.job_peers, takes one /32 of the job pool).
    for node in (node_a, node_b):
        (spec,) = _job_peers(node)
        assert (spec.public_key, list(spec.allowed_ips)) == (key, [f"{peers[0].address}/32"])
        check_job_peers(_state(node), ipplan.block(ipplan.JOB_BLOCK).cidr)


def test_the_key_of_a_live_cluster_is_refused_for_another_cluster_or_order_naming_the_field(
    buyer_api, funded_buyer, listings
):
    key = factories.wg_public_key()
    _provisioned(_place(funded_buyer, listings, key))
    body = {
        "parts": [{"listing": listings[0].pk, "gpu_count": 1}],
        "hours": 1,
        "on_part_loss": "end",
        "wireguard_public_key": key,
    }
    again = buyer_api.post(CLUSTERS, body, format="json")
    assert again.status_code == 400, again.content
    assert "wireguard_public_key" in again.json()
    single = buyer_api.post(
        "/api/v1/orders/",
        {"listing": listings[1].pk, "gpu_count": 1, "hours": 1, "wireguard_public_key": key},
        format="json",
    )
    assert single.status_code == 400, single.content
    assert "wireguard_public_key" in single.json()
    assert Cluster.objects.count() == 1 and Order.objects.count() == 2


def test_the_database_refuses_the_key_in_another_group_while_the_cluster_lives(
    funded_buyer, provider, listings, node_a, node_b
):
    key = factories.wg_public_key()
    a, _ = _provisioned(_place(funded_buyer, listings, key))
    # The mesh's own check, past the market's: another job on another node.
    with pytest.raises(PeerKeyInUse):
        create_job_peer(Node.objects.get(pk=node_b.pk), key, "order:elsewhere")
    with pytest.raises(PeerKeyInUse):
        create_job_peer(Node.objects.get(pk=node_b.pk), key, "order:x", key_group="cluster:999")
    # And the database's, past every check: a peer whose claim is not its key's and group's,
    # a second claim of the key, and a part's key moved to another group.
    peer = JobPeer.objects.get(pk=a.job_peer_id)
    with pytest.raises(IntegrityError), transaction.atomic():
        PeerKeyClaim.objects.create(
            public_key=key, group="order:other", token=PeerKeyClaim.token_for(key, "order:other")
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        JobPeer.objects.filter(pk=peer.pk).update(key_group="order:other")
    node_c = factories.enrolled_node(provider)
    with pytest.raises(IntegrityError), transaction.atomic():
        JobPeer.objects.create(
            node=node_c, public_key=key, address="10.200.9.9", ref="order:raw",
            key_group="order:raw", key_claim_id=PeerKeyClaim.token_for(key, "order:raw"),
            added_revision=1,
        )  # fmt: skip
        connection.check_constraints()  # the claim reference is checked at commit
    # A third node of the same group may have it (at the group's address).
    with transaction.atomic():
        JobPeer.objects.create(
            node=node_c, public_key=key, address=peer.address, ref="order:third",
            key_group=peer.key_group, key_claim_id=peer.key_claim_id, added_revision=1,
        )  # fmt: skip
        connection.check_constraints()
    # The same node never has the key twice, even within the group.
    with pytest.raises(IntegrityError), transaction.atomic():
        JobPeer.objects.create(
            node=node_a, public_key=key, address=peer.address, ref="order:twice",
            key_group=peer.key_group, key_claim_id=peer.key_claim_id, added_revision=1,
        )  # fmt: skip


def test_the_one_config_has_one_interface_and_a_peer_per_node_with_its_sandboxes(
    buyer_api, api_client_for, stranger, funded_buyer, listings, node_a, node_b
):
    key = factories.wg_public_key()
    cluster = _place(funded_buyer, listings, key)
    url = f"{CLUSTERS}{cluster.pk}/wireguard.conf"
    early = buyer_api.get(url)
    assert early.status_code == 409 and "not provisioned yet" in early.content.decode()
    a, b = _provisioned(cluster)
    address = JobPeer.objects.get(pk=a.job_peer_id).address
    boxes = dict(Sandbox.objects.values_list("ref", "address"))
    response = buyer_api.get(url)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    assert f"molt-cluster-{cluster.pk}.conf" in response["Content-Disposition"]
    sections = _sections(response.content.decode())
    interfaces = [s for s in sections if s[""] == "[Interface]"]
    peers = [s for s in sections if s[""] == "[Peer]"]
    assert len(interfaces) == 1 and interfaces[0]["Address"] == f"{address}/32"
    assert "PrivateKey" not in interfaces[0]
    assert [(p["PublicKey"], p["Endpoint"], p["AllowedIPs"]) for p in peers] == [
        (node_a.wireguard_public_key, node_a.endpoint, f"{boxes[f'order:{a.pk}']}/32"),
        (node_b.wireguard_public_key, node_b.endpoint, f"{boxes[f'order:{b.pk}']}/32"),
    ]
    # Another user's cluster is a 404; the JSON shows the cluster's key.
    assert api_client_for(stranger).get(url).status_code == 404
    assert buyer_api.get(f"{CLUSTERS}{cluster.pk}/").json()["wireguard_public_key"] == key


def test_a_relayed_parts_peer_sends_to_its_relay(
    buyer_api, funded_buyer, listings, node_a, node_b, settings
):
    settings.MOLT_RELAY_MODE = "nat"
    Node.objects.filter(pk=node_a.pk).update(declared_endpoint="")
    Node.objects.filter(pk=node_b.pk).update(declared_endpoint="203.0.113.9:51820")
    relay = Relay.objects.create(name="relay-1", region="", address="198.51.100.7")
    relays.issue_relay_token(relay)
    Relay.objects.filter(pk=relay.pk).update(last_seen_at=timezone.now())
    cluster = _place(funded_buyer, listings, factories.wg_public_key())
    a, b = _provisioned(cluster)
    relayed = relays.allocation_of(JobPeer.objects.get(pk=a.job_peer_id))
    assert (
        relayed is not None and relays.allocation_of(JobPeer.objects.get(pk=b.job_peer_id)) is None
    )
    peers = [
        s
        for s in _sections(buyer_api.get(f"{CLUSTERS}{cluster.pk}/wireguard.conf").content.decode())
        if s[""] == "[Peer]"
    ]
    node_b.refresh_from_db()
    assert [p["Endpoint"] for p in peers] == [relayed.buyer_endpoint, node_b.endpoint]


def test_stop_removes_the_peer_from_every_node_and_frees_the_key_and_address(
    buyer_api, funded_buyer, listings, node_a, node_b
):
    key = factories.wg_public_key()
    cluster = _place(funded_buyer, listings, key)
    _provisioned(cluster)
    _ack(node_a)
    _ack(node_b)
    lease = PeerKeyClaim.objects.get(public_key=key).allocation
    stop_cluster(cluster)
    assert _job_peers(node_a) == [] and _job_peers(node_b) == []
    assert set(JobPeer.objects.values_list("state", flat=True)) == {"removing"}
    gone = buyer_api.get(f"{CLUSTERS}{cluster.pk}/wireguard.conf")
    assert gone.status_code == 409
    _ack(node_a)
    # One node acknowledged: the other still has the peer, so the address stays leased.
    lease.refresh_from_db()
    assert lease.released_at is None
    _ack(node_b)
    assert set(JobPeer.objects.values_list("state", flat=True)) == {"removed"}
    assert not JobPeer.objects.filter(key_claim__isnull=False).exists()
    lease.refresh_from_db()
    assert lease.released_at is not None
    assert PeerKeyClaim.objects.get(public_key=key).allocation is None
    # The key is free again: a single order takes it (the claim taken over by its group).
    single = buyer_api.post(
        "/api/v1/orders/",
        {"listing": listings[1].pk, "gpu_count": 1, "hours": 1, "wireguard_public_key": key},
        format="json",
    )
    assert single.status_code == 201, single.content
    peer = JobPeer.objects.get(pk=provision_order(single.json()["id"]).job_peer_id)
    assert peer.key_claim.group == peer.ref == f"order:{single.json()['id']}"


def test_a_part_cannot_be_rekeyed_alone(funded_buyer, listings):
    a, _ = _provisioned(_place(funded_buyer, listings, factories.wg_public_key()))
    with pytest.raises(MarketError) as refused:
        rekey_order(a, factories.wg_public_key())
    assert refused.value.field == "wireguard_public_key"


def test_rekey_gives_every_parts_node_the_new_key_at_the_one_address_until_stop(
    buyer_api, funded_buyer, listings, node_a, node_b
):
    old, new = factories.wg_public_key(), factories.wg_public_key()
    cluster = _place(funded_buyer, listings, old)
    _provisioned(cluster)
    _ack(node_a)
    _ack(node_b)
    lease = PeerKeyClaim.objects.get(public_key=old).allocation
    config_before = buyer_api.get(f"{CLUSTERS}{cluster.pk}/wireguard.conf").content.decode()
    revisions = {
        n.pk: n.desired_revision for n in Node.objects.filter(pk__in=[node_a.pk, node_b.pk])
    }

    answer = buyer_api.post(
        f"{CLUSTERS}{cluster.pk}/rekey/", {"wireguard_public_key": new}, format="json"
    )
    assert answer.status_code == 200, answer.content
    assert answer.json()["wireguard_public_key"] == new
    for node in (node_a, node_b):
        (spec,) = _job_peers(node)
        assert spec.public_key == new and spec.allowed_ips[0].startswith("10.")
        assert Node.objects.get(pk=node.pk).desired_revision == revisions[node.pk] + 1
    assert {p.address for p in JobPeer.objects.all()} == {lease.address}
    assert set(Order.objects.values_list("wireguard_public_key", flat=True)) == {new}
    # The one address moved with the key, so the same file works with the new private key.
    assert PeerKeyClaim.objects.get(public_key=new).allocation == lease
    assert PeerKeyClaim.objects.get(public_key=old).allocation is None
    assert buyer_api.get(f"{CLUSTERS}{cluster.pk}/wireguard.conf").content.decode() == (
        config_before
    )
    # The old key stays open until each node drops it (its final counters are billed).
    retired = JobPeerKey.objects.filter(public_key=old)
    assert retired.count() == 2 and not retired.filter(retired_at__isnull=True).exists()

    # A retry with the same key changes nothing.
    again = buyer_api.post(
        f"{CLUSTERS}{cluster.pk}/rekey/", {"wireguard_public_key": new}, format="json"
    )
    assert again.status_code == 200
    assert Node.objects.get(pk=node_a.pk).desired_revision == revisions[node_a.pk] + 1

    # Stopped, and dropped by both nodes: the moved lease is released as usual.
    stop_cluster(cluster)
    _ack(node_a)
    _ack(node_b)
    lease.refresh_from_db()
    assert lease.released_at is not None


def test_a_part_provisioned_after_a_rekey_takes_the_new_key_and_the_one_address(
    funded_buyer, listings, node_b
):
    cluster = _place(funded_buyer, listings, factories.wg_public_key())
    a, b = parts_of(cluster)
    provision_order(a.pk)
    new = factories.wg_public_key()
    rekey_cluster(cluster, new)
    provision_order(b.pk)
    peers = JobPeer.objects.order_by("pk")
    assert [p.public_key for p in peers] == [new, new]
    assert len({p.address for p in peers}) == 1
    assert _job_peers(node_b)[0].public_key == new


def test_rekey_refuses_a_key_live_elsewhere_and_an_ended_order(buyer_api, funded_buyer, listings):
    cluster = _place(funded_buyer, listings, factories.wg_public_key())
    _provisioned(cluster)
    other = _place(funded_buyer, listings, factories.wg_public_key())
    taken = buyer_api.post(
        f"{CLUSTERS}{cluster.pk}/rekey/",
        {"wireguard_public_key": other.wireguard_public_key},
        format="json",
    )
    assert taken.status_code == 400
    assert "wireguard_public_key" in taken.json()
    assert Cluster.objects.get(pk=cluster.pk).wireguard_public_key != other.wireguard_public_key
    stop_cluster(cluster)
    ended = buyer_api.post(
        f"{CLUSTERS}{cluster.pk}/rekey/",
        {"wireguard_public_key": factories.wg_public_key()},
        format="json",
    )
    assert ended.status_code == 409


def test_the_cluster_page_lists_the_parts_and_offers_the_one_config(
    client, funded_buyer, stranger, listings, node_a, node_b
):
    cluster = _place(funded_buyer, listings, factories.wg_public_key())
    page_url = f"/clusters/{cluster.pk}/"
    client.force_login(funded_buyer)
    before = client.get(page_url)
    assert before.status_code == 200
    assert 'id="download-config" disabled' in before.content.decode()
    a, b = _provisioned(cluster)
    page = client.get(page_url).content.decode()
    address = JobPeer.objects.get(pk=a.job_peer_id).address
    boxes = dict(Sandbox.objects.values_list("ref", "address"))
    assert f'<code id="tunnel-address">{address}</code>' in page
    conf_url = f"/api/v1/clusters/{cluster.pk}/wireguard.conf"
    assert f'href="{conf_url}"' in page
    for part, node in ((a, node_a), (b, node_b)):
        assert f'<a href="/orders/{part.pk}/">#{part.pk}</a>' in page
        assert node.name in page and str(boxes[f"order:{part.pk}"]) in page
    # The link downloads with the page's session, and a part's order page links back.
    assert client.get(conf_url).content.decode().count("[Peer]") == 2
    assert f'href="/clusters/{cluster.pk}/"' in client.get(f"/orders/{a.pk}/").content.decode()
    client.force_login(stranger)
    assert client.get(page_url).status_code == 404


# --- names across the parts (docs/names.md) ------------------------------------------------------


def test_every_parts_name_resolves_in_every_sandbox_of_the_order_and_for_the_buyer(
    funded_buyer, listings, node_a, node_b
):
    from tests.db.test_names import ask, responder_index

    cluster = _place(funded_buyer, listings, factories.wg_public_key())
    a, b = _provisioned(cluster)
    box_a = Sandbox.objects.get(ref=f"order:{a.pk}")
    box_b = Sandbox.objects.get(ref=f"order:{b.pk}")
    # Another order's sandbox on node A stays in a group of its own.
    other = _place(funded_buyer, listings[:1], factories.wg_public_key(), gpus=(1,))
    (c,) = _provisioned(other)
    box_c = Sandbox.objects.get(ref=f"order:{c.pk}")
    names = {f"order-{a.pk}-0.molt": box_a.address, f"order-{b.pk}-0.molt": box_b.address}
    buyer_address = JobPeer.objects.get(pk=a.job_peer_id).address

    for node in (node_a, node_b):
        index = responder_index(node)
        # Each part's sandbox and the buyer's one tunnel address (the same on both nodes).
        for source in (box_a.address, box_b.address, buyer_address):
            for name, address in names.items():
                reply = ask(index, source, name)
                assert [i.address for rrset in reply.answer for i in rrset] == [address], (
                    node.name,
                    source,
                    name,
                )
    # The other order's sandbox neither resolves the cluster's names nor is resolved by them.
    index_a = responder_index(node_a)
    assert not ask(index_a, box_c.address, f"order-{a.pk}-0.molt").answer
    assert not ask(index_a, box_a.address, f"order-{c.pk}-0.molt").answer


def test_the_config_names_one_nodes_responder_for_every_parts_name(
    buyer_api, funded_buyer, listings, node_a, node_b
):
    Node.objects.filter(pk__in=[node_a.pk, node_b.pk]).update(names_responder=True)
    node_a.refresh_from_db()
    cluster = _place(funded_buyer, listings, factories.wg_public_key())
    a, b = _provisioned(cluster)
    boxes = dict(Sandbox.objects.values_list("ref", "address"))
    url = f"{CLUSTERS}{cluster.pk}/wireguard.conf"

    text = buyer_api.get(url).content.decode()
    # Commented by default (wg-quick up needs resolvconf for an active DNS line).
    assert f"# DNS = {node_a.mesh_address}, molt" in text
    assert "ssh root@<name>" in text and f"order-{a.pk}-0" in text and f"order-{b.pk}-0" in text
    (interface,) = [s for s in _sections(text) if s[""] == "[Interface]"]
    assert "DNS" not in interface
    peers = {p["PublicKey"]: p["AllowedIPs"] for p in _sections(text) if p[""] == "[Peer]"}
    # The responder's address is routed to its own node only.
    assert peers[node_a.wireguard_public_key] == (
        f"{boxes[f'order:{a.pk}']}/32, {node_a.mesh_address}/32"
    )
    assert peers[node_b.wireguard_public_key] == f"{boxes[f'order:{b.pk}']}/32"

    active = buyer_api.get(url + "?dns=on").content.decode()
    (interface,) = [s for s in _sections(active) if s[""] == "[Interface]"]
    assert interface["DNS"] == f"{node_a.mesh_address}, molt"


def test_without_a_responder_on_any_node_the_config_has_no_dns_line(
    buyer_api, funded_buyer, listings
):
    cluster = _place(funded_buyer, listings, factories.wg_public_key())
    _provisioned(cluster)
    text = buyer_api.get(f"{CLUSTERS}{cluster.pk}/wireguard.conf?dns=on").content.decode()
    assert "DNS" not in text
