"""Owners' pages told of node changes from the web process's database threads
(meshnet.channel_layer.Announcements, issue 14): handed to the event loop, and changes of one
kind to one owner that wait together go as one message naming every node; the provider's socket
tells the page of each of those nodes that is the user's, and of no other."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from frontend.realtime import owner_group
from meshnet.liveness import Beat, record_heartbeats
from tests.factories import enrolled_node

pytestmark = [pytest.mark.db, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    return get_channel_layer()


async def drain(layer, channel: str) -> list[dict]:
    events = []
    while True:
        try:
            events.append(await asyncio.wait_for(layer.receive(channel), 0.5))
        except TimeoutError:
            return events


def test_a_flush_that_brings_many_nodes_online_tells_their_owner_once(layer, provider, stranger):
    mine = [enrolled_node(provider, gpus=[]) for _ in range(3)]
    theirs = enrolled_node(stranger, gpus=[])
    now = mine[0].enrolled_at
    beats = {node.pk: Beat(node, now, now, None) for node in [*mine, theirs]}

    async def scenario() -> tuple[list[dict], list[dict]]:
        own, other = await layer.new_channel(), await layer.new_channel()
        await layer.group_add(owner_group(provider.pk), own)
        await layer.group_add(owner_group(stranger.pk), other)
        # As the batcher's flush runs it: on a thread that serves this event loop.
        await database_sync_to_async(record_heartbeats, thread_sensitive=False)(beats)
        return await drain(layer, own), await drain(layer, other)

    own_events, other_events = async_to_sync(scenario)()
    assert own_events == [
        {"type": "node.changed", "nodes": sorted(n.pk for n in mine), "change": "online"}
    ]
    assert other_events == [{"type": "node.changed", "node": theirs.pk, "change": "online"}]


def provider_socket(client, user) -> WebsocketCommunicator:
    from config.asgi import application

    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver"), (b"cookie", cookie)]
    return WebsocketCommunicator(application, "/ws/provider/", headers=headers)


@pytest.mark.postgres
def test_the_provider_socket_tells_the_page_of_each_own_node_a_merged_message_names(
    layer, client, provider, stranger
):
    first, second = enrolled_node(provider, gpus=[]), enrolled_node(provider, gpus=[])
    theirs = enrolled_node(stranger, gpus=[])
    socket = provider_socket(client, provider)

    async def scenario() -> list[dict]:
        connected, _ = await socket.connect()
        assert connected
        assert (await socket.receive_json_from(timeout=5))["type"] == "subscribed"
        await layer.group_send(
            owner_group(provider.pk),
            {"type": "node.changed", "nodes": [second.pk, theirs.pk, first.pk, "x"],
             "change": "inventory"},
        )  # fmt: skip
        frames = []
        while not await socket.receive_nothing(timeout=0.5):
            frames.append(await socket.receive_json_from(timeout=5))
        await socket.disconnect()
        return frames

    assert async_to_sync(scenario)() == [
        {"type": "node", "node": second.pk, "change": "inventory"},
        {"type": "node", "node": first.pk, "change": "inventory"},
    ]
