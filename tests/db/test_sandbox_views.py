"""What buyers and providers see of job sandboxes: the order's `sandbox` object (API and the
order page's Connect panel, live through the order's page group), listings' images and per-job
limits (API and provider pages), and each node's running sandboxes on the nodes page.

Sandbox rows are made directly (tests.factories.sandbox_for), as provisioning and the agent's
reports would leave them: these tests are about reading them. Host keys come from the real
ssh-keygen, which also checks the fingerprints and the known_hosts lines (ssh-keygen -F)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from django.test import Client

from frontend.realtime import order_group, owner_group
from marketplace.listings import create_listing
from marketplace.orders import place_order, stop_order
from marketplace.ssh_keys import add_ssh_key
from meshnet.models import Node, Sandbox
from meshnet.signals import sandbox_changed
from tests.db.test_realtime import events_in, layer  # noqa: F401  (a fixture)
from tests.factories import USD, sandbox_for, ssh_public_key, wg_public_key

pytestmark = [pytest.mark.db, pytest.mark.django_db]

IMAGES = ["molt/pytorch:2.4", "molt/jupyter:latest", "debian:bookworm"]


@pytest.fixture
def node(node):
    """The shared node, reporting the images its agent is configured to run."""
    Node.objects.filter(pk=node.pk).update(images=IMAGES)
    node.refresh_from_db()
    return node


@pytest.fixture
def keyed_buyer(funded_buyer):
    """The funded buyer with an SSH key: the node runs images, so its listing's orders run in
    sandboxes, which let in only the buyer's keys (an order without one is refused)."""
    add_ssh_key(funded_buyer, public_key=ssh_public_key(), name="laptop")
    return funded_buyer


@pytest.fixture
def order(keyed_buyer, listing):
    funded_buyer = keyed_buyer
    return place_order(
        funded_buyer,
        listing_id=listing.pk,
        gpu_count=2,
        hours=1,
        wireguard_public_key=wg_public_key(),
    )


@pytest.fixture(scope="module")
def host_keys(tmp_path_factory) -> list[str]:
    """sshd host keys as a sandbox makes them at start, by the real ssh-keygen."""
    keygen = shutil.which("ssh-keygen")
    assert keygen, "ssh-keygen is missing: install openssh-client"
    folder = tmp_path_factory.mktemp("host-keys")
    lines = []
    for kind in ("ed25519", "ecdsa"):
        path = folder / f"ssh_host_{kind}_key"
        subprocess.run(
            [keygen, "-q", "-t", kind, "-N", "", "-C", "", "-f", str(path)],
            check=True,
            timeout=60,
        )
        lines.append(path.with_suffix(".pub").read_text().strip())
    return lines


def keygen_fingerprint(tmp_path, line: str) -> str:
    path = tmp_path / "host.pub"
    path.write_text(line + "\n")
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(path)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return out.split()[1]


# --- the order's sandbox in the API -----------------------------------------------------------


def test_an_order_without_a_sandbox_says_null(api_client_for, funded_buyer, order):
    body = api_client_for(funded_buyer).get(f"/api/v1/orders/{order.pk}/").json()
    assert body["sandbox"] is None


def test_the_order_shows_how_to_reach_its_ready_sandbox(
    api_client_for, funded_buyer, order, host_keys, tmp_path
):
    sandbox = sandbox_for(order, host_keys=host_keys)

    body = api_client_for(funded_buyer).get(f"/api/v1/orders/{order.pk}/").json()["sandbox"]

    assert body["state"] == "ready" and body["address"] == sandbox.address
    assert body["image"] == sandbox.image
    assert body["ssh_command"] == f"ssh root@{sandbox.address}"
    assert body["gpus"] == [
        {"index": 0, "model": "RTX 4090", "uuid": sandbox.gpus[0]["uuid"]},
        {"index": 1, "model": "RTX 4090", "uuid": sandbox.gpus[1]["uuid"]},
    ]
    assert body["host_key_fingerprints"] == [keygen_fingerprint(tmp_path, k) for k in host_keys]
    assert body["ports"] == [8888]
    # The known_hosts text is what OpenSSH looks the address up in.
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(body["known_hosts"] + "\n")
    assert body["known_hosts"].splitlines() == [
        f"{sandbox.address} {k.split()[0]} {k.split()[1]}" for k in host_keys
    ]
    found = subprocess.run(
        ["ssh-keygen", "-F", sandbox.address, "-f", str(known_hosts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0 and host_keys[0].split()[1] in found.stdout


def test_the_order_list_shows_each_orders_own_sandbox(api_client_for, keyed_buyer, listing):
    funded_buyer = keyed_buyer
    first, second = (
        place_order(
            funded_buyer,
            listing_id=listing.pk,
            gpu_count=1,
            hours=1,
            wireguard_public_key=wg_public_key(),
        )
        for _ in range(2)
    )
    sandbox_for(first, state="pulling", progress=40)

    rows = api_client_for(funded_buyer).get("/api/v1/orders/").json()["results"]

    by_id = {row["id"]: row["sandbox"] for row in rows}
    assert by_id[second.pk] is None
    assert by_id[first.pk]["state"] == "pulling" and by_id[first.pk]["progress"] == 40


def test_another_buyers_order_and_its_sandbox_stay_hidden(api_client_for, stranger, order):
    sandbox_for(order)
    assert api_client_for(stranger).get(f"/api/v1/orders/{order.pk}/").status_code == 404


def test_ordering_takes_an_image_field(api_client_for, keyed_buyer, listing):
    funded_buyer = keyed_buyer
    # Too long for any image name: the serializer names the field before any order is placed.
    response = api_client_for(funded_buyer).post(
        "/api/v1/orders/",
        {
            "listing": listing.pk,
            "gpu_count": 1,
            "hours": 1,
            "wireguard_public_key": wg_public_key(),
            "image": "x" * 256,
        },
        format="json",
    )
    assert response.status_code == 400 and "image" in response.json()


# --- the order page's Connect panel ---------------------------------------------------------


def browser_for(user) -> Client:
    browser = Client()
    browser.force_login(user)
    return browser


def test_the_connect_panel_shows_command_known_hosts_gpus_and_ports(funded_buyer, order, host_keys):
    sandbox = sandbox_for(order, host_keys=host_keys)

    page = browser_for(funded_buyer).get(f"/orders/{order.pk}/").content.decode()

    assert 'id="panel-connect"' in page
    assert f'value="ssh root@{sandbox.address}"' in page
    assert f"{sandbox.address} {host_keys[0].split()[0]} {host_keys[0].split()[1]}" in page
    assert sandbox.gpus[1]["uuid"] in page and f"{sandbox.address}:8888" in page
    assert 'data-copy="ssh-command"' in page and 'data-copy="known-hosts"' in page


def test_the_connect_panel_shows_pull_progress_and_failure(funded_buyer, order):
    sandbox = sandbox_for(order, state="pulling", progress=37)
    browser = browser_for(funded_buyer)

    pulling = browser.get(f"/orders/{order.pk}/panels/").content.decode()
    assert '<progress id="sandbox-progress" max="100" value="37">' in pulling

    Sandbox.objects.filter(pk=sandbox.pk).update(state="failed", detail="image not found")
    failed = browser.get(f"/orders/{order.pk}/panels/").content.decode()
    assert "The sandbox failed: image not found" in failed
    assert 'id="ssh-command"' not in failed


def test_a_stopping_order_offers_no_login(funded_buyer, order):
    sandbox_for(order)
    stop_order(order)

    panels = browser_for(funded_buyer).get(f"/orders/{order.pk}/panels/").content.decode()

    assert 'id="sandbox-removed"' in panels and 'id="ssh-command"' not in panels


def test_the_order_page_snapshot_carries_the_sandbox_state(funded_buyer, order):
    sandbox_for(order, state="starting")
    page = browser_for(funded_buyer).get(f"/orders/{order.pk}/").content.decode()
    assert '"sandbox": {"state": "starting"' in page


def test_a_sandbox_change_tells_the_order_and_owner_pages_after_commit(
    layer,  # noqa: F811
    provider,
    order,
    django_capture_on_commit_callbacks,
):
    sandbox = sandbox_for(order, state="pulling")

    def report() -> None:
        sandbox_changed.send(sender=Sandbox, sandbox=sandbox)

    to_order = events_in(layer, order_group(order.pk), report, django_capture_on_commit_callbacks)
    to_owner = events_in(
        layer, owner_group(provider.pk), report, django_capture_on_commit_callbacks
    )

    assert to_order == [{"type": "order.changed", "order": order.pk}]
    assert to_owner == [{"type": "node.changed", "node": sandbox.node_id, "change": "sandboxes"}]


# --- ordering from the listing page ---------------------------------------------------------


def test_the_listing_page_asks_for_an_ssh_key_first_then_offers_images(
    funded_buyer, provider, node
):
    listing = create_listing(
        provider,
        node=node,
        gpu_count=1,
        price_per_gpu_hour=USD,
        price_per_gib=0,
        images=["molt/jupyter:latest", "debian:bookworm"],
    )
    browser = browser_for(funded_buyer)

    without = browser.get(f"/listings/{listing.pk}/").content.decode()
    assert 'id="no-ssh-keys"' in without and 'href="/accounts/ssh-keys/"' in without
    assert 'id="order-button"' not in without

    add_ssh_key(funded_buyer, public_key=ssh_public_key())
    page = browser.get(f"/listings/{listing.pk}/").content.decode()
    assert 'id="order-button"' in page and 'id="order-image"' in page
    assert '<option value="molt/jupyter:latest" selected>' in page
    assert '<option value="debian:bookworm">' in page


def test_a_listing_without_images_offers_the_order_without_an_ssh_key(funded_buyer, provider, node):
    """No image, no sandbox, no key needed (as the API takes it): a buyer without keys, such
    as make run's demo-buyer, can order at once."""
    listing = create_listing(
        provider, node=node, gpu_count=1, price_per_gpu_hour=USD, price_per_gib=0, images=[]
    )

    page = browser_for(funded_buyer).get(f"/listings/{listing.pk}/").content.decode()

    assert 'id="no-ssh-keys"' not in page
    assert 'id="order-button"' in page and 'id="order-image"' not in page


# --- listings: images and per-job limits ------------------------------------------------------


def test_a_listing_offers_images_the_node_runs_and_job_limits(provider_api, node):
    response = provider_api.post(
        "/api/v1/listings/",
        {
            "node": node.pk,
            "gpu_count": 2,
            "price_per_gpu_hour": USD,
            "price_per_gib": 0,
            "images": ["molt/jupyter:latest", "molt/pytorch:2.4"],
            "cpus_per_gpu": 8,
            "memory_gb_per_gpu": 32,
            "disk_gb": 200,
            "egress": False,
        },
        format="json",
    )

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["images"] == ["molt/jupyter:latest", "molt/pytorch:2.4"]
    assert (body["cpus_per_gpu"], body["memory_gb_per_gpu"], body["disk_gb"]) == (8, 32, 200)
    assert body["egress"] is False
    listed = provider_api.get(f"/api/v1/listings/{body['id']}/").json()
    assert listed["images"] == body["images"]


def test_a_listing_without_images_offers_all_the_node_runs(provider_api, node):
    body = provider_api.post(
        "/api/v1/listings/",
        {"node": node.pk, "gpu_count": 1, "price_per_gpu_hour": USD, "price_per_gib": 0},
        format="json",
    ).json()
    assert body["images"] == IMAGES
    assert (body["cpus_per_gpu"], body["memory_gb_per_gpu"], body["disk_gb"]) == (4, 16, 50)
    assert body["egress"] is True


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"images": ["evil/miner:latest"]}, "images"),
        ({"images": "molt/pytorch:2.4"}, "images"),
        ({"cpus_per_gpu": 0}, "cpus_per_gpu"),
        ({"memory_gb_per_gpu": 10**6}, "memory_gb_per_gpu"),
        ({"disk_gb": -1}, "disk_gb"),
    ],
)
def test_a_bad_image_or_limit_is_400_naming_the_field(provider_api, node, change, field):
    base = {"node": node.pk, "gpu_count": 1, "price_per_gpu_hour": USD, "price_per_gib": 0}
    created = provider_api.post("/api/v1/listings/", {**base, **change}, format="json")
    assert created.status_code == 400 and field in created.json(), created.json()

    listing = provider_api.post("/api/v1/listings/", base, format="json").json()
    changed = provider_api.patch(f"/api/v1/listings/{listing['id']}/", change, format="json")
    assert changed.status_code == 400 and field in changed.json(), changed.json()


def test_changing_a_listings_images_and_egress(provider_api, node):
    base = {"node": node.pk, "gpu_count": 1, "price_per_gpu_hour": USD, "price_per_gib": 0}
    listing = provider_api.post("/api/v1/listings/", base, format="json").json()

    changed = provider_api.patch(
        f"/api/v1/listings/{listing['id']}/",
        {"images": ["debian:bookworm"], "egress": False},
        format="json",
    )

    assert changed.status_code == 200
    assert changed.json()["images"] == ["debian:bookworm"] and changed.json()["egress"] is False


# --- provider pages ---------------------------------------------------------------------------


def test_the_provider_lists_gpus_with_images_and_limits_from_the_node_page(provider, node):
    browser = browser_for(provider)
    form = browser.get(f"/provider/nodes/{node.pk}/").content.decode()
    assert 'value="molt/jupyter:latest"' in form and 'name="cpus_per_gpu"' in form

    response = browser.post(
        f"/provider/nodes/{node.pk}/",
        {
            "gpu_model": "RTX 4090",
            "gpu_count": 1,
            "price_per_gpu_hour": "1.5",
            "price_per_gib": "0.01",
            "region": "",
            "images": ["debian:bookworm"],
            "cpus_per_gpu": 6,
            "memory_gb_per_gpu": 24,
            "disk_gb": 80,
            # egress unticked: no internet
        },
    )

    assert response.status_code == 302, response.content.decode()
    listing = node.listings.get()
    assert listing.images == ["debian:bookworm"]
    assert (listing.cpus_per_gpu, listing.memory_gb_per_gpu, listing.disk_gb) == (6, 24, 80)
    assert listing.egress is False
    page = browser.get("/provider/listings/").content.decode()
    assert "6 CPU + 24 GB per GPU, 80 GB disk, no internet" in page and "debian:bookworm" in page


def test_the_listing_edit_page_changes_images_and_limits(provider, listing, node):
    browser = browser_for(provider)
    assert 'name="disk_gb"' in browser.get(f"/provider/listings/{listing.pk}/").content.decode()

    response = browser.post(
        f"/provider/listings/{listing.pk}/",
        {
            "gpu_count": 4,
            "price_per_gpu_hour": "2",
            "price_per_gib": "0.01",
            "images": ["molt/pytorch:2.4"],
            "cpus_per_gpu": 2,
            "memory_gb_per_gpu": 8,
            "disk_gb": 20,
            "egress": "on",
        },
    )

    assert response.status_code == 302
    listing.refresh_from_db()
    assert listing.images == ["molt/pytorch:2.4"] and listing.disk_gb == 20 and listing.egress


def test_the_nodes_page_shows_each_nodes_running_sandboxes(provider, keyed_buyer, listing):
    funded_buyer = keyed_buyer
    orders = [
        place_order(
            funded_buyer,
            listing_id=listing.pk,
            gpu_count=1,
            hours=1,
            wireguard_public_key=wg_public_key(),
        )
        for _ in range(2)
    ]
    running = sandbox_for(orders[0])
    gone = sandbox_for(orders[1], state="stopped")
    Sandbox.objects.filter(pk=gone.pk).update(removed_revision=gone.added_revision + 1)
    browser = browser_for(provider)

    for path in ("/provider/nodes/", f"/provider/nodes/{listing.node_id}/card/"):
        page = browser.get(path).content.decode()
        assert f'data-ref="{running.ref}"' in page and running.address in page
        assert f'data-ref="{gone.ref}"' not in page
