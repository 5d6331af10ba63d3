"""The guards of meshnet.enrolment.enroll_node that the API tests of test_api_nodes.py go past:
a caller other than the API view (demo data, a management command) handing it a malformed
envelope, the token's expiry to the second, an identity already enrolled (its owner, its
revocation), a used token whose node is gone, and what the new node and token record. Each test
was written for a mutant mutation testing found alive (docs/testing.md, "enrolment")."""

from __future__ import annotations

import logging
from datetime import timedelta
from unittest import mock

import pytest
from clawnode.gateway_http import build_enroll_envelope
from clawnode.keys import Identity
from django.utils import timezone

from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.errors import EnrollmentRefused, UnknownRegion
from meshnet.models import EnrollmentToken, IpAllocation, Node, UsedNonce
from meshnet.signals import node_changed
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]


@pytest.mark.parametrize("envelope", [[1, 2], "body", None, {"body": [1]}, {"kind": "x"}])
def test_an_envelope_without_a_body_object_is_refused_by_the_service_itself(envelope):
    with pytest.raises(EnrollmentRefused) as refused:
        enroll_node(envelope, observed_ip=None)
    assert str(refused.value) == "request must be a signed envelope with a 'body' object"
    assert refused.value.status_code == 403
    assert not Node.objects.exists() and not UsedNonce.objects.exists()


def test_a_token_is_refused_from_the_very_second_it_expires(provider):
    token = create_enrollment_token(provider)
    expires = token.record.expires_at
    identity = Identity.generate()
    envelope = factories.enroll_request(identity, token.token, timestamp=int(expires.timestamp()))
    with (
        mock.patch("django.utils.timezone.now", return_value=expires),
        pytest.raises(EnrollmentRefused) as refused,
    ):
        enroll_node(envelope, observed_ip=None)
    assert str(refused.value) == "enrolment token has expired; create a new one"
    assert not Node.objects.exists()
    assert EnrollmentToken.objects.get().used_at is None

    # A second earlier (a fresh request: the first one's nonce is spent) it enrols.
    just_before = expires - timedelta(seconds=1)
    envelope = factories.enroll_request(
        identity, token.token, timestamp=int(just_before.timestamp())
    )
    with mock.patch("django.utils.timezone.now", return_value=just_before):
        assert enroll_node(envelope, observed_ip=None).created


def test_the_new_node_is_what_the_signed_request_says_and_consumes_its_token(provider):
    identity = Identity.generate()
    token = create_enrollment_token(provider)
    envelope = factories.enroll_request(
        identity, token.token, listen_port=51999, endpoint="198.51.100.7:51999"
    )
    body = envelope["body"]
    heard = []

    def listener(sender, node, change, **kwargs):
        heard.append((node.pk, change))

    node_changed.connect(listener)
    try:
        at = timezone.now()
        with mock.patch("django.utils.timezone.now", return_value=at):
            enrolment = enroll_node(envelope, observed_ip="192.0.2.44")
    finally:
        node_changed.disconnect(listener)

    assert enrolment.created is True
    node = Node.objects.get()
    assert enrolment.node == node
    assert (node.owner, node.node_id, node.name) == (provider, identity.node_id, f"node-{node.pk}")
    assert node.identity_public_key == body["identity_public_key"]
    assert node.wireguard_public_key == identity.wireguard_public_key_b64
    assert (node.hostname, node.listen_port, node.declared_endpoint, node.observed_ip) == (
        body["hostname"],
        51999,
        "198.51.100.7:51999",
        "192.0.2.44",
    )
    lease = IpAllocation.objects.get()
    assert (node.allocation, node.mesh_address) == (lease, lease.address)
    record = EnrollmentToken.objects.get()
    assert (record.used_at, record.node) == (at, node)
    assert heard == [(node.pk, "enrolled")]  # the owner's open pages are told


def test_enrolment_is_logged_with_the_node_its_address_and_owner(provider, caplog):
    token = create_enrollment_token(provider)
    with caplog.at_level(logging.INFO, logger="meshnet.enrolment"):
        node = enroll_node(
            factories.enroll_request(Identity.generate(), token.token), observed_ip=None
        ).node
    assert f"node {node.name} enrolled at {node.mesh_address} for user {provider.pk}" in (
        caplog.messages
    )


def test_a_retried_join_gets_the_same_node_back_as_not_created(provider):
    # A lost response: the agent sends a fresh request (new nonce) with the same token.
    identity = Identity.generate()
    token = create_enrollment_token(provider).token
    first = enroll_node(factories.enroll_request(identity, token), observed_ip=None)
    retry = enroll_node(factories.enroll_request(identity, token), observed_ip=None)
    assert (first.created, retry.created) == (True, False)
    assert retry.node == first.node and Node.objects.count() == 1


def test_an_enrolled_identity_joining_again_with_a_new_token_gets_its_node_back(provider):
    identity = Identity.generate()
    first = enroll_node(
        factories.enroll_request(identity, create_enrollment_token(provider).token),
        observed_ip=None,
    )
    again = create_enrollment_token(provider)
    at = timezone.now()
    with mock.patch("django.utils.timezone.now", return_value=at):
        second = enroll_node(factories.enroll_request(identity, again.token), observed_ip=None)

    assert (second.node, second.created) == (first.node, False)
    assert Node.objects.count() == 1 and IpAllocation.objects.count() == 1
    again.record.refresh_from_db()
    assert again.record.used_at == at  # consumed: it cannot enrol another machine


def test_an_identity_enrolled_to_another_account_is_refused(provider, stranger):
    identity = Identity.generate()
    enroll_node(
        factories.enroll_request(identity, create_enrollment_token(provider).token),
        observed_ip=None,
    )
    theirs = create_enrollment_token(stranger)
    with pytest.raises(EnrollmentRefused) as refused:
        enroll_node(factories.enroll_request(identity, theirs.token), observed_ip=None)
    assert str(refused.value) == "this identity is enrolled to another account or revoked"
    assert list(Node.objects.values_list("owner", flat=True)) == [provider.pk]
    theirs.record.refresh_from_db()
    assert theirs.record.used_at is None


def test_a_revoked_identity_cannot_join_again_even_with_its_owners_new_token(provider):
    identity = Identity.generate()
    node = enroll_node(
        factories.enroll_request(identity, create_enrollment_token(provider).token),
        observed_ip=None,
    ).node
    Node.objects.filter(pk=node.pk).update(revoked_at=timezone.now())
    fresh = create_enrollment_token(provider)
    with pytest.raises(EnrollmentRefused) as refused:
        enroll_node(factories.enroll_request(identity, fresh.token), observed_ip=None)
    assert str(refused.value) == "this identity is enrolled to another account or revoked"
    fresh.record.refresh_from_db()
    assert fresh.record.used_at is None


def test_a_used_token_whose_node_was_deleted_is_refused_not_a_crash(provider):
    identity = Identity.generate()
    token = create_enrollment_token(provider)
    node = enroll_node(factories.enroll_request(identity, token.token), observed_ip=None).node
    node.delete()  # the token's node is set to null

    with pytest.raises(EnrollmentRefused) as refused:
        enroll_node(factories.enroll_request(identity, token.token), observed_ip=None)
    assert str(refused.value) == "enrolment token was already used"
    assert not Node.objects.exists()


def test_each_refusal_says_exactly_what_is_wrong(provider):
    # The agent prints the gateway's refusal to the person running `clawnode join`: it must say
    # which check failed, in words they can act on.
    identity = Identity.generate()

    def refusal(envelope) -> str:
        with pytest.raises(EnrollmentRefused) as refused:
            enroll_node(envelope, observed_ip=None)
        return str(refused.value)

    tampered = factories.enroll_request(identity, create_enrollment_token(provider).token)
    tampered["body"]["listen_port"] = 4444
    assert refusal(tampered).startswith("signature refused: ")

    unknown = factories.enroll_request(identity, "molt_enr_not-a-real-token")
    assert refusal(unknown) == "unknown enrolment token"

    other_key = factories.enroll_request(
        identity,
        create_enrollment_token(provider).token,
        wireguard_public_key=factories.wg_public_key(),
    )
    assert refusal(other_key) == (
        "wireguard_public_key is not the X25519 conversion of the identity key"
    )

    token = create_enrollment_token(provider).token
    enroll_node(factories.enroll_request(identity, token), observed_ip=None)
    assert refusal(factories.enroll_request(Identity.generate(), token)) == (
        "enrolment token was already used"
    )
    assert Node.objects.count() == 1  # only the one enrolment that was right


def test_an_unknown_region_is_refused_before_the_token_is_looked_at(provider):
    # The region is checked before the token (meshnet.enrolment): a mistyped region is named
    # whatever the token, and a node joining again with its spent token and a mistyped region
    # is told so, not handed its node back as if the region were right.
    identity = Identity.generate()
    token = create_enrollment_token(provider).token
    enroll_node(factories.enroll_request(identity, token), observed_ip=None)
    for who, with_token in ((identity, token), (Identity.generate(), "molt_enr_not-a-real-token")):
        envelope = build_enroll_envelope(
            who, with_token, hostname="rack-1", listen_port=51820, endpoint="", gpus=(),
            region="mars",
        )  # fmt: skip
        with pytest.raises(UnknownRegion) as refused:
            enroll_node(envelope, observed_ip=None)
        assert "'mars'" in str(refused.value) and "eu-west" in str(refused.value)
    assert Node.objects.count() == 1
