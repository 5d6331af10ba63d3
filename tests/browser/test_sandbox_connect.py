"""A buyer adds an SSH key and reaches their job's sandbox from the order page, in Debian's
Chromium against the real gateway (uvicorn + a Celery worker, Redis, PostgreSQL).

The listing page asks for an SSH key first and links to the SSH keys page; the buyer pastes a
key made by the real ssh-keygen and the page lists it with the fingerprint `ssh-keygen -l`
prints; the listing then offers ordering and its images. The order is placed and the node's
sandbox reports (pulling, then ready) are written by processes configured like the gateway
(`manage.py shell` with its environment), the way status ingestion writes them, so the order
page's Connect panel goes from a progress bar to the ssh command, the known_hosts lines and the
GPUs live, without a reload. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from meshnet.models import Node, Sandbox
from tests.browser.conftest import ARTIFACTS
from tests.conftest import REPO
from tests.factories import enrolled_node, gpu
from tests.integration.conftest import gateway, wait_until  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

PASSWORD = "ssh-into-my-gpu-box-9"
IMAGES = ["molt/pytorch:2.4", "molt/jupyter:latest"]


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"sandbox-{name}.png"), full_page=True)


def keygen(folder, kind: str, comment: str) -> tuple[str, str]:
    """A key made by the real ssh-keygen: its .pub line and the fingerprint -l prints."""
    path = folder / f"id_{kind}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=60,
    )
    pub = path.with_suffix(".pub")
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True, timeout=60
    )
    return pub.read_text().strip(), listed.stdout.split()[1]


def as_gateway(gw, code: str) -> str:
    """Run `code` in a Django process with the gateway's environment (its database, Redis and
    channel prefix): what it announces reaches the pages the gateway serves."""
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=gw.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def market(gateway, provider):  # noqa: F811
    """Dora with credits and no SSH key; a node that runs two images, listed with both. Made
    before the browser starts, so the services' announcements run outside Playwright's loop."""
    dora = get_user_model().objects.create_user("dora", password=PASSWORD)
    ledger.grant_credits(dora, 100_000_000)
    node = enrolled_node(provider, gpus=[gpu(0), gpu(1), gpu(2)])
    Node.objects.filter(pk=node.pk).update(images=IMAGES)
    node.refresh_from_db()
    listing = create_listing(
        provider, node=node, gpu_count=3, price_per_gpu_hour=2_000_000, price_per_gib=10_000
    )
    return dora, listing


def test_a_buyer_adds_an_ssh_key_and_the_connect_panel_shows_how_to_log_in(
    gateway,  # noqa: F811
    market,
    browser_page,
    tmp_path,
):
    from playwright.sync_api import expect

    assert shutil.which("ssh-keygen"), "ssh-keygen is missing: install openssh-client"
    page = browser_page
    base = gateway.base_url
    _dora, listing = market
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

    # 1. Log in and open the listing: no key yet, so it asks for one instead of a button.
    page.goto(f"{base}/accounts/login/?next=/listings/{listing.pk}/")
    page.fill("#id_username", "dora")
    page.fill("#id_password", PASSWORD)
    with page.expect_navigation():
        page.click("#login-submit")
    expect(page.locator("#no-ssh-keys")).to_contain_text("has no SSH key")
    expect(page.locator("#order-button")).to_have_count(0)

    # 2. Follow the link and add a key made by ssh-keygen.
    public_key, fingerprint = keygen(tmp_path, "ed25519", "dora@laptop")
    with page.expect_navigation():
        page.click("#add-ssh-key-link")
    assert page.url == f"{base}/accounts/ssh-keys/"
    page.fill("#id_name", "laptop")
    page.fill("#id_public_key", public_key)
    with page.expect_navigation():
        page.click("#add-ssh-key")
    row = page.locator("#ssh-keys tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator(".key-name")).to_have_text("laptop")
    expect(row.locator(".fingerprint")).to_have_text(fingerprint)
    shot(page, "ssh-keys")

    # A private key pasted by mistake is refused beside the field, with what to paste instead.
    page.fill("#id_name", "")
    page.fill("#id_public_key", (tmp_path / "id_ed25519").read_text())
    with page.expect_navigation():
        page.click("#add-ssh-key")
    expect(page.locator("#id_public_key_error")).to_contain_text(
        "this is a private key: paste the .pub file"
    )
    expect(page.locator("#ssh-keys tbody tr")).to_have_count(1)

    # 3. The listing now offers ordering, with its images.
    page.goto(f"{base}/listings/{listing.pk}/")
    expect(page.locator("#order-button")).to_have_count(1)
    expect(page.locator("#order-image option")).to_have_text(IMAGES)

    # 4. An order (placed as the API would, by a process of the gateway) and its sandbox
    # pulling the image.
    order_id = int(
        as_gateway(
            gateway,
            "from django.contrib.auth import get_user_model\n"
            "from marketplace.orders import place_order\n"
            "from tests.factories import wg_public_key\n"
            "dora = get_user_model().objects.get(username='dora')\n"
            f"order = place_order(dora, listing_id={listing.pk}, gpu_count=2, hours=1,"
            " wireguard_public_key=wg_public_key())\n"
            "print(order.pk)\n",
        ).split()[-1]
    )
    wait_until(
        lambda: Order.objects.get(pk=order_id).state != "pending",
        timeout=30,
        message="the worker to provision the order",
    )
    report = "from tests.factories import report_sandbox\nreport_sandbox({}, **{})\n"
    as_gateway(gateway, report.format(order_id, repr({"state": "pulling", "progress": 40})))
    page.goto(f"{base}/orders/{order_id}/")
    expect(page.locator("#live-status")).to_have_text("live")
    expect(page.locator("#sandbox-state")).to_have_text("pulling")
    expect(page.locator("#sandbox-progress")).to_have_attribute("value", "40")
    shot(page, "connect-pulling")

    # 5. The node reports it ready, with fresh host keys: the panel redraws live.
    host_keys = []
    for kind in ("ed25519", "ecdsa"):
        (tmp_path / kind).mkdir()
        host_keys.append(keygen(tmp_path / kind, kind, "")[0])
    ready = {"state": "ready", "progress": 100, "host_keys": host_keys, "ports": [8888]}
    as_gateway(gateway, report.format(order_id, repr(ready)))

    sandbox = Sandbox.objects.get(ref=f"order:{order_id}")
    expect(page.locator("#sandbox-state")).to_have_text("ready")
    expect(page.locator("#ssh-command")).to_have_value(f"ssh root@{sandbox.address}")
    known_hosts = "\n".join(
        f"{sandbox.address} {line.split()[0]} {line.split()[1]}" for line in host_keys
    )
    expect(page.locator("#known-hosts")).to_have_value(known_hosts)
    gpus = page.locator("#sandbox-gpus li")
    expect(gpus).to_have_count(2)
    for gpu_row, reported in zip(gpus.all(), sandbox.gpus, strict=True):
        expect(gpu_row).to_contain_text(f"GPU{reported['index']}")
        expect(gpu_row).to_contain_text(reported["uuid"])
    expect(page.locator("#sandbox-ports")).to_have_text(f"{sandbox.address}:8888")
    expect(page.locator("#copy-ssh")).to_be_visible()
    shot(page, "connect-ready")

    assert console_errors == []
