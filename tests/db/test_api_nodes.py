"""The mesh API: enrolment tokens with their install line, the agent's signed enrolment call,
and a provider's own nodes (404 for anybody else's)."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta

import pytest
from clawnode.keys import Identity
from django.utils import timezone
from rest_framework.test import APIClient

from meshnet.gateway_key import gateway_identity
from meshnet.models import EnrollmentToken, IpAllocation, Node, UsedNonce
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]

TOKENS = "/api/v1/enrollment-tokens/"
ENROLL = "/api/v1/nodes/enroll/"
NODES = "/api/v1/nodes/"
MOLT_RANGE = ipaddress.IPv4Network("10.100.128.0/17")


@pytest.fixture
def agent():
    """The agent's HTTP client: no session, no API token, and CSRF enforced as for a browser."""
    return APIClient(enforce_csrf_checks=True)


def test_a_machine_is_told_the_address_it_is_seen_at_with_no_credential(agent):
    """What `clawnode join` compares with its own addresses (docs/provider.md): the request's
    source, nothing else, for anybody."""
    response = agent.get("/api/v1/nodes/address/", REMOTE_ADDR="203.0.113.40")

    assert response.status_code == 200, response.content
    assert response.json() == {"address": "203.0.113.40"}


# --- enrolment tokens ------------------------------------------------------------------------


def test_a_provider_gets_a_one_time_token_and_the_line_that_installs_the_agent(
    provider_api, provider, settings
):
    response = provider_api.post(TOKENS)

    assert response.status_code == 201, response.content
    body = response.json()
    token = body["token"]
    assert token.startswith("molt_enr_")
    assert body["install_command"] == (
        f"curl -fsSL http://testserver/install.sh | sudo sh -s -- --token {token}"
    )
    record = EnrollmentToken.objects.get(owner=provider)
    assert record.token_hash != token and token not in record.token_hash  # stored hashed
    expires = datetime.fromisoformat(body["expires_at"])
    ttl = timedelta(seconds=settings.MOLT_ENROLLMENT_TOKEN_TTL_SECONDS)
    assert abs(expires - (timezone.now() + ttl)) < timedelta(seconds=30)


def test_the_install_line_uses_the_host_the_provider_reached(provider_api, settings):
    settings.ALLOWED_HOSTS = ["gw.example.net"]

    response = provider_api.post(TOKENS, HTTP_HOST="gw.example.net", secure=True)

    assert response.json()["install_command"].startswith(
        "curl -fsSL https://gw.example.net/install.sh | sudo sh -s -- --token molt_enr_"
    )


# --- enrolment -------------------------------------------------------------------------------


def issue_token(provider_api) -> str:
    return provider_api.post(TOKENS).json()["token"]


def test_an_agent_enrols_with_a_signed_request_and_learns_its_place_in_the_mesh(
    provider_api, provider, agent
):
    identity = Identity.generate()
    envelope = factories.enroll_request(
        identity, issue_token(provider_api), gpus=[factories.gpu(0)]
    )

    response = agent.post(ENROLL, envelope, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    node = Node.objects.get(node_id=identity.node_id)
    assert node.owner == provider
    assert body == {
        "node_id": identity.node_id,
        "name": f"node-{node.pk}",
        "mesh_address": node.mesh_address,
        "gateway_public_key": gateway_identity().public_key_b64,
        "gateway_key_sequence": 0,  # never rotated: the key from before any rotation
        "websocket_url": "ws://testserver/ws/agent/",
        "wireguard_listen_port": 51820,
        "hub_address": "10.100.0.1",
        # The whole mesh: the hub and every node block are on-link on the node's interface.
        "mesh_network": "10.100.0.0/16",
        "job_network": "10.64.0.0/11",
        "region": "",
    }
    assert ipaddress.IPv4Address(body["mesh_address"]) in MOLT_RANGE
    assert node.observed_ip == "127.0.0.1"  # the address the request came from
    assert node.wireguard_public_key == identity.wireguard_public_key_b64


def test_re_running_join_is_safe_and_returns_the_same_node(provider_api, agent):
    identity = Identity.generate()
    token = issue_token(provider_api)
    first = agent.post(ENROLL, factories.enroll_request(identity, token), format="json")

    retry = agent.post(ENROLL, factories.enroll_request(identity, token), format="json")

    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.json() == first.json()
    assert Node.objects.count() == 1


def test_a_replayed_enrolment_request_is_refused(provider_api, agent):
    envelope = factories.enroll_request(Identity.generate(), issue_token(provider_api))
    assert agent.post(ENROLL, envelope, format="json").status_code == 201

    replay = agent.post(ENROLL, envelope, format="json")

    assert replay.status_code == 403
    assert replay.json()["code"] == "enrollment_refused"
    assert "replayed" in replay.json()["detail"]
    assert Node.objects.count() == 1


def test_a_tampered_enrolment_request_is_refused(provider_api, agent):
    envelope = factories.enroll_request(Identity.generate(), issue_token(provider_api))
    envelope["body"]["listen_port"] = 4444  # changed after signing

    response = agent.post(ENROLL, envelope, format="json")

    assert response.status_code == 403
    assert "signature" in response.json()["detail"]
    assert Node.objects.count() == 0


def test_an_unknown_token_is_refused(agent):
    envelope = factories.enroll_request(Identity.generate(), "molt_enr_not-a-real-token")

    response = agent.post(ENROLL, envelope, format="json")

    assert response.status_code == 403
    assert "unknown enrolment token" in response.json()["detail"]
    assert Node.objects.count() == 0


def test_a_used_token_is_refused_for_another_machine(provider_api, agent):
    token = issue_token(provider_api)
    assert (
        agent.post(
            ENROLL, factories.enroll_request(Identity.generate(), token), format="json"
        ).status_code
        == 201
    )

    second = agent.post(ENROLL, factories.enroll_request(Identity.generate(), token), format="json")

    assert second.status_code == 403
    assert "already used" in second.json()["detail"]
    assert Node.objects.count() == 1


def test_an_expired_token_is_refused(provider_api, agent):
    token = issue_token(provider_api)
    EnrollmentToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    response = agent.post(
        ENROLL, factories.enroll_request(Identity.generate(), token), format="json"
    )

    assert response.status_code == 403
    assert "expired" in response.json()["detail"]


def test_a_wireguard_key_that_is_not_the_identitys_conversion_is_refused_writing_nothing(
    provider_api, agent
):
    # The node's WireGuard key is derived from its identity, so whoever holds a node's identity
    # holds its tunnel: a request naming any other key (validly signed) would let the enrolled
    # interface be someone else's.
    identity = Identity.generate()
    token = issue_token(provider_api)
    envelope = factories.enroll_request(
        identity, token, wireguard_public_key=factories.wg_public_key()
    )

    response = agent.post(ENROLL, envelope, format="json")

    assert response.status_code == 403, response.content
    assert response.json()["code"] == "enrollment_refused"
    assert "not the X25519 conversion of the identity key" in response.json()["detail"]
    # Nothing half-written: no node, the token unused, no address leased, the nonce not spent.
    assert Node.objects.count() == 0
    assert EnrollmentToken.objects.filter(used_at=None, node=None).count() == 1
    assert IpAllocation.objects.count() == 0
    assert UsedNonce.objects.count() == 0
    # So the same token (and nonce) still enrols the machine once it sends its real key.
    nonce = envelope["body"]["nonce"]
    fixed = factories.enroll_request(identity, token, nonce=nonce)
    assert agent.post(ENROLL, fixed, format="json").status_code == 201
    assert Node.objects.get().wireguard_public_key == identity.wireguard_public_key_b64


@pytest.mark.parametrize(
    ("skew", "accepted"),
    [(-301, False), (-300, True), (300, True), (301, False)],
    ids=["past-just-outside", "past-just-inside", "future-just-inside", "future-just-outside"],
)
def test_an_enrolment_is_accepted_only_within_the_allowed_clock_skew(
    provider_api, agent, settings, skew, accepted
):
    # The timestamp bounds how long a captured request stays replayable once its nonce is
    # pruned (see the nonce tests below): a stale request is refused whatever its token.
    from unittest import mock

    settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS = 300
    token = issue_token(provider_api)
    now = timezone.now().replace(microsecond=0)
    envelope = factories.enroll_request(
        Identity.generate(), token, timestamp=int(now.timestamp()) + skew
    )

    with mock.patch("django.utils.timezone.now", return_value=now):
        response = agent.post(ENROLL, envelope, format="json")

    if accepted:
        assert response.status_code == 201, response.content
        assert Node.objects.count() == 1
    else:
        assert response.status_code == 403
        direction = "in the past" if skew < 0 else "in the future"
        assert response.json()["detail"] == (
            f"stale request: timestamp is {abs(skew)} s {direction} (allowed skew 300 s)"
        )
        assert Node.objects.count() == 0
        assert EnrollmentToken.objects.filter(used_at=None).count() == 1


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        ({}, {"kind", "body", "signature"}),
        ({"kind": "molt/enroll/v1", "body": [1, 2], "signature": "x"}, {"body"}),
    ],
    ids=["empty", "body-not-an-object"],
)
def test_a_malformed_envelope_is_a_400_naming_the_fields(agent, payload, fields):
    response = agent.post(ENROLL, payload, format="json")

    assert response.status_code == 400
    assert set(response.json()) - {"detail", "code"} == fields


def test_an_enrolment_body_that_is_not_a_valid_request_is_a_400(agent):
    response = agent.post(
        ENROLL, {"kind": "molt/enroll/v1", "body": {"token": "x"}, "signature": "x"}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["detail"].startswith("invalid enrolment request")


# --- nodes -----------------------------------------------------------------------------------


def test_a_provider_sees_their_nodes_with_their_gpus(provider_api, provider):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0), factories.gpu(1, "L4", 23034)])

    listed = provider_api.get(NODES).json()
    detail = provider_api.get(f"{NODES}{node.pk}/").json()

    assert listed["results"] == [detail]
    assert detail["id"] == node.pk
    assert detail["name"] == node.name
    assert detail["mesh_address"] == node.mesh_address
    assert detail["online"] is False and detail["last_seen"] is None  # no heartbeat yet
    assert detail["region"] == "eu-west"
    assert detail["endpoint"] == "203.0.113.10:51820"
    assert detail["gpus"] == [
        {
            "index": 0,
            "name": "RTX 4090",
            "memory_mb": 24564,
            "vram_gb": 24,
            "driver_version": "550.54",
            "cuda_version": "12.4",
            "simulated": False,
            "temperature_c": None,
            "utilization_pct": None,
        },
        {
            "index": 1,
            "name": "L4",
            "memory_mb": 23034,
            "vram_gb": 22,
            "driver_version": "550.54",
            "cuda_version": "12.4",
            "simulated": False,
            "temperature_c": None,
            "utilization_pct": None,
        },
    ]


def test_a_node_seen_recently_is_online(provider_api, provider):
    node = factories.enrolled_node(provider)
    Node.objects.filter(pk=node.pk).update(last_seen_at=timezone.now())

    body = provider_api.get(f"{NODES}{node.pk}/").json()

    assert body["online"] is True
    assert body["last_seen"] is not None


def test_a_stranger_sees_none_of_someone_elses_nodes(api_client_for, stranger, provider):
    node = factories.enrolled_node(provider)
    stranger_api = api_client_for(stranger)

    assert stranger_api.get(NODES).json()["results"] == []
    response = stranger_api.get(f"{NODES}{node.pk}/")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_a_token_made_by_one_user_enrols_the_node_to_that_user(api_client_for, stranger, agent):
    token = api_client_for(stranger).post(TOKENS).json()["token"]

    agent.post(ENROLL, factories.enroll_request(Identity.generate(), token), format="json")

    assert list(Node.objects.values_list("owner__username", flat=True)) == ["mallory"]


def test_nonces_are_forgotten_only_once_a_replay_would_be_stale(provider_api, agent, settings):
    from unittest import mock

    from meshnet.models import UsedNonce
    from meshnet.tasks import prune_used_nonces

    settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS = 300
    sent_at = int(timezone.now().timestamp()) - 290  # nearly the oldest still accepted
    envelope = factories.enroll_request(
        Identity.generate(), issue_token(provider_api), timestamp=sent_at
    )
    assert agent.post(ENROLL, envelope, format="json").status_code == 201
    assert prune_used_nonces() == 0  # just seen: a replay now would be fresh enough

    # Twice the skew and a minute later the nonce is pruned, and a replay of the same request is
    # still refused: by its timestamp this time.
    later = timezone.now() + timedelta(seconds=661)
    with mock.patch("django.utils.timezone.now", return_value=later):
        assert prune_used_nonces() == 1
        assert not UsedNonce.objects.exists()
        replay = agent.post(ENROLL, envelope, format="json")
    assert replay.status_code == 403
    assert "timestamp" in replay.json()["detail"]
    assert Node.objects.count() == 1


def test_nonces_younger_than_twice_the_skew_are_kept(provider_api, agent, settings):
    from meshnet.models import UsedNonce
    from meshnet.tasks import prune_used_nonces

    settings.MOLT_ENROLLMENT_MAX_SKEW_SECONDS = 300
    envelope = factories.enroll_request(Identity.generate(), issue_token(provider_api))
    assert agent.post(ENROLL, envelope, format="json").status_code == 201
    UsedNonce.objects.update(seen_at=timezone.now() - timedelta(seconds=600))

    assert prune_used_nonces() == 0
    assert UsedNonce.objects.count() == 1
