"""Job sandboxes on the gateway: one desired revision adds a job's peer and sandbox, GPUs go to
one sandbox at a time, the address comes from the node's /27, the signed desired state carries
the spec, the agent's signed SANDBOX_STATUS moves the sandbox forward only, and the order runs
only when its peer is acknowledged and its sandbox ready (failure releases the hold, stop
removes both). Driven through the real services; the agent's messages are signed with the
node's own identity, as `clawnode` signs them."""

from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta

import pytest
from clawnode import wire
from clawnode.keys import Identity
from django.utils import timezone

from config.celery import app as celery_app
from marketplace import ledger
from marketplace.errors import MarketError
from marketplace.models import Order
from marketplace.orders import place_order, provision_order, stop_order
from meshnet import ipplan
from meshnet.agent_channel import AgentRefused, acknowledge_revision, process_sandbox_status
from meshnet.allocation import sandbox_pool_name
from meshnet.desired_state import desired_state
from meshnet.errors import NotEnoughGpus
from meshnet.models import IpAllocation, JobPeer, Node, Sandbox, SandboxGpu
from meshnet.nodes import update_inventory
from meshnet.peers import create_job_peer, remove_job_peer
from meshnet.sandboxes import SandboxRequest
from meshnet.wgconfig import buyer_config
from tests import factories
from tests.factories import SANDBOX_IMAGE, USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

OTHER_IMAGE = "docker.io/molt/pytorch:2.4"


@pytest.fixture(autouse=True)
def eager(settings):
    """What runs after commit here (sandbox_changed's receivers, and the desired-state push a
    failed order's removal enqueues) runs in-process, into an in-memory channel layer, never to
    whatever broker the machine has."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def agent(provider):
    """The provider's node with four GPUs and the identity its agent signs with."""
    from marketplace.demo_data import enrol_node

    node, identity = enrol_node(
        provider,
        hostname=socket.gethostname(),
        gpus=[factories.gpu(i) for i in range(4)],
        observed_ip="203.0.113.10",
    )
    return node, identity


@pytest.fixture
def node(agent):
    return agent[0]


@pytest.fixture
def listing(provider, node):
    return factories.sandbox_listing(
        provider, node, gpu_count=4, images=(SANDBOX_IMAGE, OTHER_IMAGE)
    )


@pytest.fixture
def keyed_buyer(funded_buyer):
    factories.ssh_key(funded_buyer, name="laptop")
    return funded_buyer


def place(buyer, listing, *, gpu_count=1, hours=2, image=None) -> Order:
    return place_order(
        buyer,
        listing_id=listing.pk,
        gpu_count=gpu_count,
        hours=hours,
        wireguard_public_key=factories.wg_public_key(),
        image=image,
    )


def provisioned(buyer, listing, **kwargs) -> Order:
    order = place(buyer, listing, **kwargs)
    provision_order(order.pk)
    return reload(order)


def reload(order: Order) -> Order:
    return Order.objects.select_related("job_peer").get(pk=order.pk)


def sandbox_of(order: Order) -> Sandbox:
    return Sandbox.objects.get(ref=f"order:{order.pk}")


def gpus_of(order: Order) -> list[int]:
    return sorted(
        SandboxGpu.objects.filter(sandbox__ref=f"order:{order.pk}").values_list("index", flat=True)
    )


def ack(node, at=None) -> None:
    node.refresh_from_db()
    acknowledge_revision(node, node.desired_revision, at=at)


def report(agent, django_capture_on_commit_callbacks, *reports, node_id=None):
    """The agent's signed SANDBOX_STATUS, processed as the consumer does, with what runs after
    commit (sandbox_changed and its receivers) run too."""
    node, identity = agent
    envelope = factories.sandbox_status_envelope(identity, node_id or node.node_id, *reports)
    with django_capture_on_commit_callbacks(execute=True):
        process_sandbox_status(Node.objects.get(pk=node.pk), envelope)


# --- one revision, exclusive GPUs, the node's /27, the signed spec --------------------------


def test_one_desired_revision_adds_the_peer_and_its_sandbox(keyed_buyer, node, listing):
    before = Node.objects.get(pk=node.pk).desired_revision
    order = provisioned(keyed_buyer, listing, gpu_count=2)
    sandbox = sandbox_of(order)
    assert Node.objects.get(pk=node.pk).desired_revision == before + 1
    assert sandbox.added_revision == order.job_peer.added_revision == before + 1
    assert sandbox.peer_address == order.job_peer.address
    assert (sandbox.image, sandbox.cpus_milli, sandbox.memory_mb, sandbox.disk_gb) == (
        SANDBOX_IMAGE,
        2 * 4 * 1000,
        2 * 16 * 1024,
        50,
    )
    # Provisioning again (a retried task) adds nothing.
    provision_order(order.pk)
    assert Sandbox.objects.count() == 1
    assert Node.objects.get(pk=node.pk).desired_revision == before + 1


def test_the_desired_state_carries_the_signed_sandbox_spec(keyed_buyer, node, listing):
    order = provisioned(keyed_buyer, listing, gpu_count=2, image=OTHER_IMAGE)
    sandbox = sandbox_of(order)
    state = desired_state(Node.objects.get(pk=node.pk))
    (spec,) = state.sandboxes
    assert spec == wire.SandboxSpec(
        ref=f"order:{order.pk}",
        image=OTHER_IMAGE,
        address=f"{sandbox.address}/32",
        peer_address=f"{order.job_peer.address}/32",
        gpus=(0, 1),
        cpus=8000,
        memory_mb=32768,
        disk_gb=50,
        pids_limit=4096,
        egress=True,
        ssh_keys=tuple(order.ssh_keys),
    )
    # What the agent parses is what was signed.
    assert wire.DesiredState.from_dict(state.to_dict()).sandboxes == (spec,)
    assert [peer.ref for peer in state.peers] == [spec.ref]


def test_gpus_go_to_one_sandbox_at_a_time(keyed_buyer, node, listing):
    first = provisioned(keyed_buyer, listing, gpu_count=3)
    second = provisioned(keyed_buyer, listing, gpu_count=1)
    assert gpus_of(first) == [0, 1, 2]
    assert gpus_of(second) == [3]
    # The node is full: the mesh refuses a fifth GPU, and writes nothing.
    revision = Node.objects.get(pk=node.pk).desired_revision
    leases = IpAllocation.objects.count()
    with pytest.raises(NotEnoughGpus) as err:
        create_job_peer(
            node,
            factories.wg_public_key(),
            ref="order:elsewhere",
            sandbox=SandboxRequest(
                image=SANDBOX_IMAGE, gpu_count=1, cpus_milli=1000, memory_mb=1024, disk_gb=1
            ),
        )
    assert "0 free GPU(s), 1 asked" in str(err.value)
    assert not err.value.transient
    assert not JobPeer.objects.filter(ref="order:elsewhere").exists()
    assert Node.objects.get(pk=node.pk).desired_revision == revision
    assert IpAllocation.objects.count() == leases


def test_gpus_of_a_job_that_ended_count_once_toward_a_shortage_that_will_pass(
    keyed_buyer, node, listing
):
    """A GPU still held by a stopped job's sandbox (the agent has not yet removed it) is
    'being freed': a request it would satisfy is a shortage that passes (transient: the order
    waits), one it would not is lasting (the order fails). Each such GPU counts once (mutation
    testing found a double count survive)."""
    provisioned(keyed_buyer, listing, gpu_count=2)
    ended = provisioned(keyed_buyer, listing, gpu_count=1)
    stop_order(reload(ended))
    assert sandbox_of(ended).removed_revision is not None  # not acked: its GPU is still held

    def ask(count: int) -> NotEnoughGpus:
        with pytest.raises(NotEnoughGpus) as err:
            create_job_peer(
                node,
                factories.wg_public_key(),
                ref=f"order:ask-{count}",
                sandbox=SandboxRequest(
                    image=SANDBOX_IMAGE, gpu_count=count, cpus_milli=1000, memory_mb=1024,
                    disk_gb=1,
                ),
            )  # fmt: skip
        return err.value

    lasting = ask(3)  # 1 free + 1 being freed < 3
    assert "1 free GPU(s), 3 asked; 1 more are being freed by jobs that ended" in str(lasting)
    assert not lasting.transient
    passing = ask(2)  # 1 free + 1 being freed == 2
    assert "1 free GPU(s), 2 asked; 1 more are being freed" in str(passing)
    assert passing.transient


def test_the_constraint_decides_when_the_free_gpu_check_is_wrong(
    keyed_buyer, node, listing, monkeypatch
):
    """A race the node lock should prevent: the constraint still gives a GPU to one sandbox."""
    provisioned(keyed_buyer, listing, gpu_count=1)  # holds GPU 0
    monkeypatch.setattr("meshnet.sandboxes._free_gpu_indexes", lambda node, model=None: ([0, 1], 0))
    with pytest.raises(NotEnoughGpus):
        create_job_peer(
            node,
            factories.wg_public_key(),
            ref="order:racer",
            sandbox=SandboxRequest(
                image=SANDBOX_IMAGE, gpu_count=1, cpus_milli=1000, memory_mb=1024, disk_gb=1
            ),
        )
    assert not Sandbox.objects.filter(ref="order:racer").exists()
    assert not JobPeer.objects.filter(ref="order:racer").exists()
    assert SandboxGpu.objects.filter(index=0).count() == 1


def test_the_sandbox_address_is_inside_the_nodes_27(keyed_buyer, node, listing):
    orders = [provisioned(keyed_buyer, listing) for _ in range(3)]
    subnet = ipplan.sandbox_subnet(node.mesh_address)
    assert subnet.prefixlen == 27
    addresses = [ipaddress.IPv4Address(sandbox_of(order).address) for order in orders]
    assert all(address in subnet for address in addresses)
    assert len(set(addresses)) == 3
    assert subnet.network_address not in addresses
    leases = IpAllocation.objects.filter(address__in=[str(a) for a in addresses])
    assert {lease.pool.name for lease in leases} == {sandbox_pool_name(node.pk)}
    assert {lease.purpose for lease in leases} == {IpAllocation.Purpose.SANDBOX}


def test_a_tunnel_only_listing_gets_no_sandbox(funded_buyer, provider, node):
    from marketplace.listings import create_listing

    plain = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0
    )
    order = provisioned(funded_buyer, plain)
    assert order.image == "" and order.ssh_keys == []
    assert not Sandbox.objects.exists()
    assert desired_state(Node.objects.get(pk=node.pk)).sandboxes == ()
    ack(node)
    assert reload(order).state == "running"


# --- ordering: image and keys ----------------------------------------------------------------


def test_an_order_takes_the_first_image_by_default_and_snapshots_the_keys(keyed_buyer, listing):
    second = factories.ssh_key(keyed_buyer, name="desktop")
    order = place(keyed_buyer, listing)
    assert order.image == SANDBOX_IMAGE
    lines = list(keyed_buyer.ssh_keys.values_list("public_key", flat=True))
    assert order.ssh_keys == lines and len(lines) == 2
    # A key deleted after ordering is still in the placed order and in its sandbox.
    second.delete()
    provision_order(order.pk)
    assert sandbox_of(order).ssh_keys == lines
    assert reload(order).ssh_keys == lines


def test_an_image_the_listing_does_not_offer_is_refused(keyed_buyer, listing):
    with pytest.raises(MarketError) as err:
        place(keyed_buyer, listing, image="docker.io/evil/miner:1")
    assert err.value.field == "image"
    assert not Order.objects.exists()


def test_a_buyer_without_an_ssh_key_is_told_how_to_add_one(funded_buyer, listing):
    before = ledger.available_for(funded_buyer)
    with pytest.raises(MarketError) as err:
        place(funded_buyer, listing)
    assert err.value.field == "ssh_keys"
    assert "SSH keys page" in str(err.value) and "POST /api/v1/ssh-keys/" in str(err.value)
    assert not Order.objects.exists()
    assert ledger.available_for(funded_buyer) == before


# --- the agent's signed status ---------------------------------------------------------------


def test_a_status_with_a_bad_signature_is_refused_and_writes_nothing(
    agent, keyed_buyer, listing, django_capture_on_commit_callbacks
):
    node, _identity = agent
    order = provisioned(keyed_buyer, listing)
    forged = factories.sandbox_status_envelope(
        Identity.generate(), node.node_id, {"ref": f"order:{order.pk}", "state": "ready"}
    )
    with pytest.raises(AgentRefused) as err:
        process_sandbox_status(node, forged)
    assert err.value.close_code == wire.CLOSE_BAD_MESSAGE
    assert sandbox_of(order).state == Sandbox.State.PENDING


def test_a_status_naming_another_node_is_refused(
    agent, keyed_buyer, listing, django_capture_on_commit_callbacks
):
    order = provisioned(keyed_buyer, listing)
    other = factories.enrolled_node(order.listing.owner, gpus=[factories.gpu(0)])
    with pytest.raises(AgentRefused):
        report(
            agent,
            django_capture_on_commit_callbacks,
            {"ref": f"order:{order.pk}", "state": "ready"},
            node_id=other.node_id,
        )
    assert sandbox_of(order).state == Sandbox.State.PENDING


def test_a_node_cannot_report_another_nodes_sandbox(
    agent, keyed_buyer, provider, listing, django_capture_on_commit_callbacks
):
    from marketplace.demo_data import enrol_node

    order = provisioned(keyed_buyer, listing)
    intruder = enrol_node(
        provider, hostname="other", gpus=[factories.gpu(0)], observed_ip="203.0.113.11"
    )
    report(
        intruder,
        django_capture_on_commit_callbacks,
        {"ref": f"order:{order.pk}", "state": "failed", "detail": "x"},
    )
    sandbox = sandbox_of(order)
    assert (sandbox.state, sandbox.detail, sandbox.reported_at) == (Sandbox.State.PENDING, "", None)
    assert reload(order).state == "provisioning"


def test_states_move_forward_only_and_ready_is_stamped_once(
    agent, keyed_buyer, listing, django_capture_on_commit_callbacks
):
    order = provisioned(keyed_buyer, listing)
    ref = f"order:{order.pk}"
    host_key = factories.ssh_public_key_line("root@sandbox")
    report(
        agent, django_capture_on_commit_callbacks, {"ref": ref, "state": "pulling", "progress": 40}
    )
    assert (sandbox_of(order).state, sandbox_of(order).progress) == ("pulling", 40)
    ready = {
        "ref": ref,
        "state": "ready",
        "gpus": [factories.gpu(0).to_dict()],
        "host_keys": [host_key],
        "ports": [8888],
    }
    report(agent, django_capture_on_commit_callbacks, ready)
    first = sandbox_of(order)
    assert first.state == "ready" and first.ready_at is not None
    assert (first.gpus, first.host_keys, first.ports) == (
        [factories.gpu(0).to_dict()],
        [host_key],
        [8888],
    )
    # A late "starting" changes nothing; a second "ready" keeps the first time.
    report(agent, django_capture_on_commit_callbacks, {"ref": ref, "state": "starting"})
    report(agent, django_capture_on_commit_callbacks, {**ready, "ports": [8888, 6006]})
    again = sandbox_of(order)
    assert again.state == "ready" and again.ready_at == first.ready_at
    assert again.ports == [8888, 6006]
    # Nothing leaves failed.
    report(
        agent, django_capture_on_commit_callbacks, {"ref": ref, "state": "failed", "detail": "oom"}
    )
    report(agent, django_capture_on_commit_callbacks, ready)
    assert sandbox_of(order).state == "failed"


# --- the order: running only when both, failure, stop ----------------------------------------


def test_the_order_runs_only_when_the_peer_is_acked_and_the_sandbox_ready(
    agent, keyed_buyer, listing, django_capture_on_commit_callbacks
):
    node, _ = agent
    order = provisioned(keyed_buyer, listing)
    acked = timezone.now() - timedelta(seconds=30)
    ack(node, at=acked)
    assert reload(order).job_peer.state == JobPeer.State.ACTIVE
    assert reload(order).state == "provisioning"  # the sandbox is not ready yet
    ref = f"order:{order.pk}"
    report(agent, django_capture_on_commit_callbacks, {"ref": ref, "state": "starting"})
    assert reload(order).state == "provisioning"
    report(agent, django_capture_on_commit_callbacks, {"ref": ref, "state": "ready"})
    order = reload(order)
    assert order.state == "running"
    # Billing starts when both are true: the later of the two.
    assert order.running_since == sandbox_of(order).ready_at
    assert order.running_since > acked


def test_a_sandbox_ready_before_the_ack_runs_from_the_ack(
    agent, keyed_buyer, listing, django_capture_on_commit_callbacks
):
    node, _ = agent
    order = provisioned(keyed_buyer, listing)
    report(
        agent, django_capture_on_commit_callbacks, {"ref": f"order:{order.pk}", "state": "ready"}
    )
    assert reload(order).state == "provisioning"  # the peer is not acknowledged yet
    acked = timezone.now() + timedelta(seconds=5)
    ack(node, at=acked)
    order = reload(order)
    assert (order.state, order.running_since) == ("running", acked)


def test_a_failed_sandbox_fails_the_order_and_releases_the_hold_exactly(
    agent, keyed_buyer, listing, settings, django_capture_on_commit_callbacks
):
    node, _ = agent
    before = ledger.available_for(keyed_buyer)
    order = provisioned(keyed_buyer, listing, gpu_count=2)
    assert ledger.available_for(keyed_buyer) == before - order.hold_amount
    ack(node)
    detail = "pull docker.io/molt/sandbox-base:1: manifest unknown"
    report(
        agent,
        django_capture_on_commit_callbacks,
        {"ref": f"order:{order.pk}", "state": "failed", "detail": detail},
    )
    order = reload(order)
    assert order.state == "failed"
    assert detail in order.reason
    assert ledger.available_for(keyed_buyer) == before
    assert ledger.held_for(keyed_buyer) == 0
    # Peer and sandbox leave in one revision; the GPUs stay taken until the agent says so.
    sandbox = sandbox_of(order)
    assert sandbox.removed_revision == order.job_peer.removed_revision is not None
    assert gpus_of(order) == [0, 1]
    # The order ended, so the listing's GPUs are free to order; but on the node two are still
    # in the failed container until the agent acks: an order that needs them waits pending
    # (nothing written, the sweep retries) instead of failing.
    waiting = place(keyed_buyer, listing, gpu_count=3)
    provision_order(waiting.pk)
    assert (reload(waiting).state, reload(waiting).job_peer) == ("pending", None)
    ack(node)
    assert gpus_of(order) == []
    lease = sandbox_of(order).allocation
    assert lease.reusable_after - lease.released_at == timedelta(
        seconds=settings.MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS
    )
    provision_order(waiting.pk)
    assert reload(waiting).state == "provisioning"
    assert gpus_of(waiting) == [0, 1, 2]


def test_once_a_nodes_27_has_wrapped_a_released_address_goes_to_the_next_sandbox(
    keyed_buyer, node, listing, settings
):
    # A node's /27 hands out 30 fresh addresses, then reuses released ones. The ended sandbox
    # (and its job peer) let go of the reused lease row: before, the next sandbox's one-to-one
    # insert failed and its order stayed pending for good (benchmarks/order_to_ssh.py's 31st).
    settings.MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS = 0
    first = provisioned(keyed_buyer, listing)
    ack(node)
    stop_order(reload(first))
    ack(node)
    old = sandbox_of(first)
    assert old.state == Sandbox.State.STOPPED and old.allocation.released_at is not None
    pool = IpAllocation.objects.get(pk=old.allocation_id).pool
    IpAllocation.objects.filter(pk=old.allocation_id).update(reusable_after=timezone.now())
    type(pool).objects.filter(pk=pool.pk).update(next_offset=31)  # the 30 fresh ones are gone

    second = provisioned(keyed_buyer, listing)

    assert second.state == "provisioning", second.reason
    assert sandbox_of(second).address == old.address
    assert sandbox_of(second).allocation_id == old.allocation_id
    old.refresh_from_db()
    assert old.allocation_id is None and old.address == sandbox_of(second).address


def test_stop_removes_peer_and_sandbox_and_frees_the_gpus_when_the_agent_acks(
    agent, keyed_buyer, listing, django_capture_on_commit_callbacks
):
    node, _ = agent
    order = provisioned(keyed_buyer, listing, gpu_count=4)
    ack(node)
    report(
        agent, django_capture_on_commit_callbacks, {"ref": f"order:{order.pk}", "state": "ready"}
    )
    assert reload(order).state == "running"
    before = Node.objects.get(pk=node.pk).desired_revision
    stop_order(reload(order))
    node.refresh_from_db()
    assert node.desired_revision == before + 1
    state = desired_state(node)
    assert state.peers == () and state.sandboxes == ()
    assert sandbox_of(order).removed_revision == node.desired_revision
    assert gpus_of(order) == [0, 1, 2, 3]  # the container may still be there
    ack(node)
    assert reload(order).state == "completed"
    assert sandbox_of(order).state == Sandbox.State.STOPPED
    assert gpus_of(order) == []


def test_remove_job_peer_drops_the_sandbox_in_the_same_revision(keyed_buyer, node, listing):
    order = provisioned(keyed_buyer, listing)
    peer = remove_job_peer(f"order:{order.pk}")
    assert sandbox_of(order).removed_revision == peer.removed_revision


def test_a_revoked_nodes_sandboxes_are_released(keyed_buyer, node, listing):
    from meshnet.nodes import revoke_node

    order = provisioned(keyed_buyer, listing, gpu_count=2)
    revoke_node(node)
    sandbox = sandbox_of(order)
    assert sandbox.removed_revision is not None and sandbox.state == Sandbox.State.STOPPED
    assert gpus_of(order) == []
    assert sandbox.allocation.released_at is not None


# --- quarantine, the buyer's config, the node's images ---------------------------------------


def test_quarantine_defaults_are_short(settings):
    from config import settings as project_settings

    assert project_settings.MOLT_ADDRESS_QUARANTINE_SECONDS == 120
    assert project_settings.MOLT_JOB_ADDRESS_QUARANTINE_SECONDS == 120
    assert project_settings.MOLT_SANDBOX_ADDRESS_QUARANTINE_SECONDS == 60


def test_the_buyers_config_routes_the_sandbox_address_only():
    text = buyer_config(
        job_address="10.100.128.7",
        provider_public_key=factories.wg_public_key(),
        provider_address="10.100.128.2",
        endpoint="203.0.113.10:51820",
        order_label="order 1",
        sandbox_address="10.128.0.65",
    )
    assert "AllowedIPs = 10.128.0.65/32" in text
    assert "Address = 10.100.128.7/32" in text
    assert "AllowedIPs = 10.100.128.2/32" not in text


def test_the_inventory_stores_the_nodes_images(node):
    update_inventory(node, [], images=[SANDBOX_IMAGE, OTHER_IMAGE])
    assert Node.objects.get(pk=node.pk).images == [SANDBOX_IMAGE, OTHER_IMAGE]
    update_inventory(node, [])  # an agent that does not say keeps what was there
    assert Node.objects.get(pk=node.pk).images == [SANDBOX_IMAGE, OTHER_IMAGE]


@pytest.mark.parametrize(
    "images",
    ["docker.io/x:1", ["bad image"], [SANDBOX_IMAGE, SANDBOX_IMAGE], ["x"] * 65, [7]],
)
def test_a_malformed_image_list_is_refused_and_nothing_stored(node, images):
    with pytest.raises(AgentRefused) as err:
        update_inventory(node, [], images=images)
    assert "images" in str(err.value)
    assert Node.objects.get(pk=node.pk).images == []


def test_a_pulling_sandbox_outlives_the_provisioning_timeout_while_it_reports_progress(
    agent, keyed_buyer, listing, settings
):
    from marketplace.orders import expire_orders
    from meshnet.sandboxes import record_sandbox_status

    node, _ = agent
    settings.MOLT_PROVISIONING_TIMEOUT_SECONDS = 120
    before = ledger.available_for(keyed_buyer)
    order = provisioned(keyed_buyer, listing)
    ack(node)
    created = order.created_at

    def pulling(progress: int, at_seconds: int) -> None:
        status = wire.SandboxStatus(
            node_id=node.node_id,
            sandboxes=(
                wire.SandboxReport(ref=f"order:{order.pk}", state="pulling", progress=progress),
            ),
            timestamp=0,
        )
        record_sandbox_status(node, status, at=created + timedelta(seconds=at_seconds))

    pulling(10, 100)
    assert expire_orders(created + timedelta(seconds=130)) == 0
    assert reload(order).state == "provisioning"
    pulling(10, 150)  # the same report again is no progress: it does not keep the order
    assert expire_orders(created + timedelta(seconds=230)) == 1
    order = reload(order)
    assert order.state == "failed"
    assert order.reason == "the sandbox was not ready in time (last: pulling)"
    assert ledger.available_for(keyed_buyer) == before


def test_the_sweep_moves_an_order_whose_sandbox_signal_was_lost(agent, keyed_buyer, listing):
    """A ready report recorded without its after-commit signal running (no callbacks captured
    here): expire_orders' sweep starts the order anyway."""
    from marketplace.orders import expire_orders

    node, _ = agent
    order = provisioned(keyed_buyer, listing)
    ack(node)
    report_only = factories.sandbox_status_envelope(
        agent[1], node.node_id, {"ref": f"order:{order.pk}", "state": "ready"}
    )
    process_sandbox_status(node, report_only)
    assert reload(order).state == "provisioning"
    assert expire_orders() == 1
    assert reload(order).state == "running"


def test_a_sandbox_dying_while_running_ends_the_order_billed_up_to_the_report(
    agent, keyed_buyer, listing, django_capture_on_commit_callbacks
):
    from marketplace.audit import audit_ledger
    from marketplace.models import Settlement

    node, _ = agent
    order = provisioned(keyed_buyer, listing)
    ack(node, at=timezone.now() - timedelta(hours=1))
    ref = f"order:{order.pk}"
    report(agent, django_capture_on_commit_callbacks, {"ref": ref, "state": "ready"})
    Order.objects.filter(pk=order.pk).update(running_since=timezone.now() - timedelta(hours=1))
    report(
        agent,
        django_capture_on_commit_callbacks,
        {"ref": ref, "state": "failed", "detail": "container exited: OOM killed"},
    )
    order = reload(order)
    assert order.state == "failed"
    assert order.reason == "sandbox failed: container exited: OOM killed"
    assert order.ended_at == sandbox_of(order).reported_at
    settlement = Settlement.objects.get(order=order)
    assert 3600 <= settlement.billed_seconds + settlement.offline_seconds < 3600 + 60
    assert order.job_peer.state == JobPeer.State.REMOVING
    assert sandbox_of(order).removed_revision == order.job_peer.removed_revision
    assert audit_ledger() == []


def test_an_order_waiting_for_gpus_of_an_ended_job_fails_after_the_timeout(
    agent, keyed_buyer, listing, settings, django_capture_on_commit_callbacks
):
    ended = provisioned(keyed_buyer, listing, gpu_count=4)
    report(
        agent, django_capture_on_commit_callbacks, {"ref": f"order:{ended.pk}", "state": "failed"}
    )
    assert reload(ended).state == "failed"  # its GPUs stay taken: the agent has not acked
    before = ledger.available_for(keyed_buyer)
    waiting = place(keyed_buyer, listing, gpu_count=1)
    provision_order(waiting.pk)
    assert reload(waiting).state == "pending"
    Order.objects.filter(pk=waiting.pk).update(
        created_at=timezone.now() - timedelta(seconds=settings.MOLT_PROVISIONING_TIMEOUT_SECONDS)
    )
    provision_order(waiting.pk)
    waiting = reload(waiting)
    assert waiting.state == "failed"
    assert "being freed by jobs that ended" in waiting.reason
    assert ledger.available_for(keyed_buyer) == before


def test_a_job_gets_gpus_of_its_listings_model_only(keyed_buyer, provider):
    from marketplace.demo_data import enrol_node

    mixed, _ = enrol_node(
        provider,
        hostname="mixed",
        gpus=[factories.gpu(0, "RTX 4090"), factories.gpu(1, "A100 80GB", 81920)],
        observed_ip="203.0.113.13",
    )
    from marketplace.listings import create_listing
    from marketplace.models import Listing

    a100 = create_listing(
        provider, node=mixed, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0,
        gpu_model="A100 80GB",
    )  # fmt: skip
    Listing.objects.filter(pk=a100.pk).update(images=[SANDBOX_IMAGE])
    a100.refresh_from_db()
    order = provisioned(keyed_buyer, a100)
    assert gpus_of(order) == [1]
