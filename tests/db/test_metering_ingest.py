"""Signed metering samples become order bytes once, across resends and counter resets."""

from __future__ import annotations

import time

import pytest
from clawnode import protocol
from clawnode.keys import Identity

from marketplace import ledger
from marketplace.services import create_listing, place_order, provision_order
from meshnet import services as mesh
from meshnet.models import MeteringSample
from tests.factories import enroll_request, gpu, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

BOOT = protocol.new_nonce()


@pytest.fixture
def running_job(buyer, provider):
    identity = Identity.generate()
    issued = mesh.create_enrollment_token(provider)
    node = mesh.enroll_node(
        enroll_request(identity, issued.token, gpus=[gpu(0)]), observed_ip=None
    ).node
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=1_000_000, price_per_gib=0
    )
    ledger.grant_credits(buyer, 10_000_000)
    key = wg_public_key()
    order = place_order(
        buyer, listing_id=listing.pk, gpu_count=1, hours=1, wireguard_public_key=key
    )
    order = provision_order(order.pk)
    mesh.acknowledge_revision(node, node.__class__.objects.get(pk=node.pk).desired_revision)
    order.refresh_from_db()
    assert order.state == "running"
    return identity, node, order, key


def sample(identity, key, seq, epoch, rx, tx, signer=None):
    body = protocol.MeteringSample(
        node_id=identity.node_id,
        boot_id=BOOT,
        seq=seq,
        sampled_at=int(time.time()),
        peers=(protocol.PeerCounters(public_key=key, epoch=epoch, rx_bytes=rx, tx_bytes=tx),),
    ).to_dict()
    return protocol.signed_envelope(protocol.METERING, body, signer or identity)


def test_samples_add_deltas_to_the_order(running_job):
    identity, node, order, key = running_job
    mesh.ingest_metering(node, sample(identity, key, 1, 0, 1000, 5000))
    mesh.ingest_metering(node, sample(identity, key, 2, 0, 1500, 9000))
    order.refresh_from_db()
    # rx is what the provider received (the buyer sent): the buyer's bytes_out.
    assert (order.bytes_out, order.bytes_in) == (1500, 9000)


def test_a_resent_sample_counts_once(running_job):
    identity, node, order, key = running_job
    envelope = sample(identity, key, 1, 0, 1000, 2000)
    assert mesh.ingest_metering(node, envelope) == 1
    assert mesh.ingest_metering(node, envelope) == 0
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (1000, 2000)
    assert MeteringSample.objects.filter(node=node).count() == 1


def test_counter_reset_with_new_epoch_loses_nothing(running_job):
    identity, node, order, key = running_job
    mesh.ingest_metering(node, sample(identity, key, 1, 0, 1000, 1000))
    mesh.ingest_metering(node, sample(identity, key, 2, 1, 300, 400))  # agent restarted the peer
    mesh.ingest_metering(node, sample(identity, key, 3, 1, 800, 900))
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (1800, 1900)


def test_sample_signed_by_another_key_is_refused_and_stores_nothing(running_job):
    identity, node, order, key = running_job
    with pytest.raises(mesh.AgentRefused, match="metering refused"):
        mesh.ingest_metering(node, sample(identity, key, 1, 0, 10, 10, signer=Identity.generate()))
    order.refresh_from_db()
    assert (order.bytes_out, order.bytes_in) == (0, 0)
    assert not MeteringSample.objects.exists()
