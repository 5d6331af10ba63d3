"""`manage.py rotate_gateway_key`: a new gateway key certified by the old one, both kept, the
new one signing every desired state from then on with the chain beside it; nodes are pushed
their state at once and need not re-join (the agent's side: tests/unit/test_key_rotation.py,
tests/integration/test_gateway_key_rotation.py)."""

from __future__ import annotations

import io
import json
import os
import stat
import time

import pytest
from clawnode import wire
from clawnode.keys import Identity, parse_ed25519_public_key
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from meshnet import channel_layer
from meshnet.consumers import desired_state_frame
from meshnet.desired_state import desired_state, signed_desired_state
from meshnet.fanout import AGENTS_GROUP
from meshnet.gateway_key import (
    gateway_identity,
    gateway_key_path,
    key_certificates,
    key_sequence,
)
from meshnet.models import Node
from meshnet.nodes import revoke_node
from meshnet.tasks import rotate_gateway_key_if_due
from tests import factories

pytestmark = [pytest.mark.db, pytest.mark.django_db]


class RecordingLayer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    async def group_send(self, group: str, message: dict) -> None:
        self.sent.append((group, message))


@pytest.fixture(autouse=True)
def own_state_dir(settings, tmp_path):
    """A gateway key of this test's own: rotating the session's would change it under others."""
    settings.MOLT_STATE_DIR = tmp_path / "gateway-state"
    return settings.MOLT_STATE_DIR


@pytest.fixture
def layer(monkeypatch):
    recording = RecordingLayer()
    monkeypatch.setattr(channel_layer, "get_channel_layer", lambda: recording)
    return recording


def rotate(*args: str) -> str:
    out = io.StringIO()
    call_command("rotate_gateway_key", *args, stdout=out)
    return out.getvalue()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_rotation_certifies_the_new_key_with_the_old_keeps_both_and_signs_with_the_new(
    own_state_dir, layer, provider
):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0)])
    first = gateway_identity()

    output = rotate()

    second = gateway_identity()
    assert second.public_key != first.public_key
    assert f"{first.public_key_b64} -> {second.public_key_b64} (certificate 1)" in output
    retired = Identity.load(own_state_dir / "gateway-keys" / "0.key")
    assert retired.public_key == first.public_key
    for path in (gateway_key_path(), own_state_dir / "gateway-keys" / "0.key"):
        assert mode(path) == 0o600
    chain = key_certificates()
    assert wire.follow_key_chain(first.public_key, 0, chain, 2**40) == (second.public_key, 1)
    # Every node was pushed its state, signed by the new key, with the chain beside it.
    # (one fanout message per chunk of nodes, meshnet.fanout, carrying each node's state)
    assert [group for group, _ in layer.sent] == [AGENTS_GROUP]
    envelope = layer.sent[0][1]["states"][node.node_id]
    assert wire.open_envelope(envelope, second.public_key, wire.DESIRED_STATE)["node_id"] == (
        node.node_id
    )
    frame = desired_state_frame(signed_desired_state(node))
    assert frame["key_certs"] == chain
    with pytest.raises(wire.BadSignature):
        wire.open_envelope(frame["envelope"], first.public_key, wire.DESIRED_STATE)


def test_a_second_rotation_extends_the_chain_an_agent_at_the_first_key_follows(layer):
    first = gateway_identity()
    rotate()
    rotate()
    third = gateway_identity()

    chain = key_certificates()
    assert [c["body"]["sequence"] for c in chain] == [1, 2]
    assert wire.follow_key_chain(first.public_key, 0, chain, 2**40) == (third.public_key, 2)


def test_before_any_rotation_no_certificates_go_to_agents(layer, provider):
    node = factories.enrolled_node(provider, gpus=[factories.gpu(0)])
    assert "key_certs" not in desired_state_frame(signed_desired_state(node))


def test_if_older_than_leaves_a_young_key_alone(layer):
    before = gateway_identity().public_key

    assert "not rotated" in rotate("--if-older-than", "30")
    assert gateway_identity().public_key == before
    assert key_certificates() == []

    rotate("--if-older-than", "0")
    assert gateway_identity().public_key != before


def test_a_key_that_is_not_the_chains_last_is_not_rotated_from(own_state_dir, layer):
    rotate()
    # Someone restored an older gateway.key: certifying from it would fork the chain.
    Identity.generate().save(gateway_key_path())
    chain = json.loads((own_state_dir / "gateway-key-certs.json").read_text())

    with pytest.raises(CommandError, match="restore the key from backup"):
        rotate()
    assert json.loads((own_state_dir / "gateway-key-certs.json").read_text()) == chain


def enrol(provider_api) -> dict:
    identity = Identity.generate()
    token = provider_api.post("/api/v1/enrollment-tokens/").json()["token"]
    response = APIClient().post(
        "/api/v1/nodes/enroll/", factories.enroll_request(identity, token), format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


def test_a_node_enrolled_after_rotations_is_told_its_keys_place_in_the_chain(layer, provider_api):
    assert enrol(provider_api)["gateway_key_sequence"] == 0
    rotate()
    rotate()

    answer = enrol(provider_api)

    assert answer["gateway_public_key"] == gateway_identity().public_key_b64
    assert answer["gateway_key_sequence"] == 2
    # What the agent pins (clawnode join) is where it follows the next rotation from.
    rotate()
    followed = wire.follow_key_chain(
        parse_ed25519_public_key(answer["gateway_public_key"]),
        answer["gateway_key_sequence"],
        key_certificates(),
        2**40,
    )
    assert followed == (gateway_identity().public_key, 3)


def test_each_key_of_the_chain_has_its_sequence_and_a_stranger_none(layer):
    assert key_sequence(gateway_identity().public_key_b64) == 0
    keys = [gateway_identity().public_key_b64]
    for _ in range(2):
        rotate()
        keys.append(gateway_identity().public_key_b64)
    assert [key_sequence(key) for key in keys] == [0, 1, 2]
    assert key_sequence(Identity.generate().public_key_b64) is None


def test_a_rotation_gives_live_nodes_a_new_revision_whose_hub_peer_has_the_new_key(
    layer, provider, settings
):
    settings.MOLT_HUB_ENDPOINT = "192.0.2.10:51800"
    node = factories.enrolled_node(provider)
    gone = factories.enrolled_node(provider)
    revoke_node(gone)
    before = {n.pk: n.desired_revision for n in Node.objects.all()}

    rotate("--no-push")

    after = {n.pk: n.desired_revision for n in Node.objects.all()}
    assert after == {node.pk: before[node.pk] + 1, gone.pk: before[gone.pk]}
    # Unacknowledged now: the repush-lagging-nodes sweep sends it if no push arrives.
    assert list(Node.objects.lagging()) == [node]
    (hub,) = [p for p in desired_state(node).peers if p.ref == "hub"]
    assert hub.public_key == gateway_identity().wireguard_public_key_b64


# --- automatic rotation (beat) ------------------------------------------------------------------


def signed_for(days: float) -> None:
    """Make the current key look as if it had signed for `days` (its file's age before any
    rotation: meshnet.gateway_key.current_key_since)."""
    then = time.time() - days * 86400
    gateway_identity()
    os.utime(gateway_key_path(), (then, then))


def test_beat_rotates_the_key_once_it_is_due_and_pushes_every_live_node(layer, provider, settings):
    settings.MOLT_GATEWAY_KEY_MAX_AGE_DAYS = 30
    node = factories.enrolled_node(provider)
    signed_for(29.9)
    before = gateway_identity().public_key

    assert rotate_gateway_key_if_due() is False
    assert gateway_identity().public_key == before and key_certificates() == []

    signed_for(30.1)
    revision = Node.objects.get(pk=node.pk).desired_revision
    assert rotate_gateway_key_if_due() is True

    assert gateway_identity().public_key != before
    assert [c["body"]["sequence"] for c in key_certificates()] == [1]
    assert Node.objects.get(pk=node.pk).desired_revision == revision + 1
    assert node.node_id in layer.sent[0][1]["states"]
    # The new key has signed for no time at all: the next run leaves it alone.
    assert rotate_gateway_key_if_due() is False
    assert len(key_certificates()) == 1


def test_beat_never_rotates_with_the_max_age_zero(layer, settings):
    settings.MOLT_GATEWAY_KEY_MAX_AGE_DAYS = 0
    signed_for(10_000)
    before = gateway_identity().public_key

    assert rotate_gateway_key_if_due() is False
    assert gateway_identity().public_key == before


def test_the_beat_schedule_checks_the_keys_age_every_hour():
    from django.conf import settings as django_settings

    entry = django_settings.CELERY_BEAT_SCHEDULE["rotate-gateway-key"]
    assert entry == {"task": "meshnet.tasks.rotate_gateway_key_if_due", "schedule": 3600.0}
    assert django_settings.MOLT_GATEWAY_KEY_MAX_AGE_DAYS == 90  # on by default
