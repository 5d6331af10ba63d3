"""Cluster regions used: a node that declares a region at enrolment (`clawnode join --region`)
gets its mesh address in that region's block of the IP plan, the molt block otherwise; a region
the plan lacks is refused (400, naming the field) before the token is spent; one region's block
running out leaves the others alone; a listing's region is its node's."""

from __future__ import annotations

import ipaddress

import pytest
from clawnode import wire
from clawnode.gateway_http import build_enroll_envelope
from clawnode.keys import Identity
from rest_framework.test import APIClient

from marketplace.errors import MarketError
from marketplace.listings import create_listing
from meshnet import ipplan
from meshnet.models import IpAllocation, IpPool, Node
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

ENROLL = "/api/v1/nodes/enroll/"
TOKENS = "/api/v1/enrollment-tokens/"
LISTINGS = "/api/v1/listings/"


@pytest.fixture
def agent() -> APIClient:
    return APIClient()


def enroll(agent, provider_api, *, region: str, identity: Identity | None = None, token=None):
    identity = identity or Identity.generate()
    token = token or provider_api.post(TOKENS).json()["token"]
    envelope = build_enroll_envelope(
        identity,
        token,
        hostname="rack-1",
        listen_port=51820,
        endpoint="",
        gpus=[factories.gpu(0)],
        region=region,
    )
    return agent.post(ENROLL, envelope, format="json"), identity, token


def test_a_node_that_declares_a_region_gets_its_address_in_that_regions_block(agent, provider_api):
    response, identity, _ = enroll(agent, provider_api, region="asia")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["region"] == "asia"
    assert body["mesh_address"] == "10.100.64.1"  # the first host of asia's 10.100.64.0/20
    # The interface is on-link for the whole mesh: the hub and nodes of every block.
    assert body["mesh_network"] == "10.100.0.0/16"
    node = Node.objects.get(node_id=identity.node_id)
    assert (node.region, node.allocation.pool.name) == ("asia", "asia")
    assert node.allocation.purpose == IpAllocation.Purpose.NODE
    # Its sandboxes get a /27 no node of the molt block can have.
    assert ipplan.sandbox_subnet(node.mesh_address).subnet_of(
        ipplan.block(ipplan.REGION_SANDBOX_BLOCK).network
    )


def test_a_node_without_a_region_takes_the_molt_block_as_before(agent, provider_api):
    response, _, _ = enroll(agent, provider_api, region="")

    assert response.status_code == 201, response.content
    assert response.json()["region"] == ""
    assert ipaddress.IPv4Address(response.json()["mesh_address"]) in ipplan.block("molt").network


def test_an_unknown_region_is_refused_naming_the_field_and_the_token_is_kept(agent, provider_api):
    response, identity, token = enroll(agent, provider_api, region="mars")

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "unknown_region"
    assert "mars" in body["region"][0] and "eu-west" in body["region"][0]
    assert not Node.objects.exists() and not IpAllocation.objects.exists()
    # The provider fixes the typo and joins with the same token.
    again, _, _ = enroll(agent, provider_api, region="eu-west", identity=identity, token=token)
    assert again.status_code == 201, again.content
    assert again.json()["mesh_address"] == "10.100.48.1"


def test_a_region_longer_than_the_protocol_allows_is_a_malformed_request(agent, provider_api):
    # The agent refuses to build it; a hand-made one, signed, is refused by the gateway.
    identity = Identity.generate()
    token = provider_api.post(TOKENS).json()["token"]
    envelope = build_enroll_envelope(
        identity, token, hostname="h", listen_port=51820, endpoint="", gpus=[]
    )
    body = {**envelope["body"], "region": "x" * 17}
    response = agent.post(ENROLL, wire.signed_envelope(wire.ENROLL, body, identity), format="json")

    assert response.status_code == 400
    assert "region" in response.json()["detail"]


def test_re_joining_keeps_the_nodes_region_and_address(agent, provider_api):
    first, identity, token = enroll(agent, provider_api, region="us-east")

    retry, _, _ = enroll(agent, provider_api, region="asia", identity=identity, token=token)

    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.json()["mesh_address"] == first.json()["mesh_address"] == "10.100.32.1"
    assert retry.json()["region"] == "us-east"


def test_a_full_region_refuses_with_its_name_and_leaves_the_other_blocks_alone(agent, provider_api):
    eu_west = ipplan.block("eu-west").network
    # Every host of eu-west's /20 handed out (offset 4095 is past its last host, 4094).
    IpPool.objects.create(name="eu-west", cidr=str(eu_west), next_offset=4095)

    full, _, _ = enroll(agent, provider_api, region="eu-west")
    asia, _, _ = enroll(agent, provider_api, region="asia")
    molt, _, _ = enroll(agent, provider_api, region="")

    assert full.status_code == 409, full.content
    assert "'eu-west' is exhausted" in full.json()["detail"]
    assert (asia.status_code, asia.json()["mesh_address"]) == (201, "10.100.64.1")
    assert (molt.status_code, molt.json()["mesh_address"]) == (201, "10.100.128.1")
    assert not IpAllocation.objects.filter(pool__name="eu-west").exists()


def test_a_listing_takes_its_nodes_region_and_cannot_claim_another(provider):
    node = factories.enrolled_node(provider, region="us-west")
    assert node.mesh_address == "10.100.16.1"

    with pytest.raises(MarketError) as err:
        create_listing(
            provider,
            node=node,
            gpu_count=1,
            price_per_gpu_hour=1_000_000,
            price_per_gib=0,
            region="asia",
        )
    assert err.value.field == "region" and "us-west" in str(err.value)

    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    assert listing.region == "us-west"
    same = create_listing(
        provider,
        node=node,
        gpu_count=1,
        price_per_gpu_hour=1_000_000,
        price_per_gib=0,
        region="us-west",
    )
    assert same.region == "us-west"


def test_the_api_refuses_a_listing_region_other_than_its_nodes(provider, provider_api):
    node = factories.enrolled_node(provider, region="asia")

    response = provider_api.post(
        LISTINGS,
        {
            "node": node.pk,
            "gpu_count": 1,
            "price_per_gpu_hour": 1,
            "price_per_gib": 0,
            "region": "eu-west",
        },
        format="json",
    )

    assert response.status_code == 400, response.content
    assert "asia" in response.json()["region"][0]
    ok = provider_api.post(
        LISTINGS,
        {"node": node.pk, "gpu_count": 1, "price_per_gpu_hour": 1, "price_per_gib": 0},
        format="json",
    )
    assert ok.status_code == 201, ok.content
    assert ok.json()["region"] == "asia"


def test_the_enrolment_request_of_an_agent_that_declares_no_region_has_no_region_field():
    # A gateway that predates regions refuses unknown fields: an agent that declares none
    # sends the body such a gateway knows.
    envelope = build_enroll_envelope(
        Identity.generate(), "molt_enr_x", hostname="h", listen_port=1, endpoint="", gpus=[]
    )
    assert "region" not in envelope["body"]
    assert wire.EnrollRequest.from_dict(envelope["body"]).region == ""
