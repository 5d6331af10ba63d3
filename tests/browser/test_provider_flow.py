"""A provider onboards a machine, in Debian's Chromium against the real gateway (uvicorn and a
Celery worker on the network testbed's bridge, Redis, PostgreSQL).

The provider logs in and opens the nodes page, which goes live over /ws/provider/; creates an
install command; the command runs, as root, in a network namespace with no systemd, against the
live server (`curl -fsSL .../install.sh | sh -s -- --token T --skip-apt --no-systemd ...`); the
machine appears on the open page without a reload, with its simulated GPUs; and when its agent
starts (`clawnode run` with wireguard-go in that namespace) the card turns online, again without
a reload. Nothing is loaded from anywhere but the gateway. Screenshots go to
test-artifacts/browser/.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from meshnet.models import Node
from tests.browser.conftest import ARTIFACTS
from tests.integration.conftest import running_gateway, wait_until
from tests.netns.test_install_script import CLEAN_ENV, build_wheelhouse
from tests.netns.testbed import network_testbed

pytestmark = [
    pytest.mark.browser,
    pytest.mark.netns,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
]

PASSWORD = "sell-my-gpus-by-the-hour-3"


def test_a_provider_installs_a_machine_and_watches_it_join_and_come_online(
    tmp_path, settings, django_user_model, browser_page
):
    from playwright.sync_api import expect

    page = browser_page
    django_user_model.objects.create_user("bob", password=PASSWORD)
    wheelhouse = build_wheelhouse(tmp_path / "wheelhouse")
    prefix = tmp_path / "clawnode"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    console_errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

    with network_testbed() as bed:
        ns = bed.namespace("prov")
        provider_ip = bed.attach(ns)
        interface = bed.wireguard_name("p")
        with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
            base = gateway.base_url

            # -- log in, land on the nodes page, which goes live ------------------------------
            page.goto(f"{base}/provider/nodes/")
            assert "/accounts/login/" in page.url
            page.fill("#id_username", "bob")
            page.fill("#id_password", PASSWORD)
            with page.expect_navigation():
                page.click("#login-submit")
            assert page.url == f"{base}/provider/nodes/"
            page.wait_for_selector('#live-status[data-state="on"]', timeout=15_000)
            assert page.locator("#no-nodes").is_visible()
            assert page.locator(".node-card").count() == 0

            # -- an install command, shown once ----------------------------------------------
            with page.expect_navigation():
                page.click("#create-token")
            command = page.input_value("#install-command")
            match = re.fullmatch(
                rf"curl -fsSL {re.escape(base)}/install\.sh \| sudo sh -s -- --token "
                r"(molt_enr_[\w-]+)",
                command,
            )
            assert match, command
            page.screenshot(path=str(ARTIFACTS / "provider-install-command.png"), full_page=True)
            page.wait_for_selector('#live-status[data-state="on"]', timeout=15_000)
            # Anything that reloads the page would drop this marker.
            page.evaluate("window.__sameDocument = true")

            # -- the command runs on the machine (root already, so without sudo) -------------
            # The live server is plain http at a veth address: --insecure says that is meant.
            flags = (
                f"--insecure --skip-apt --no-systemd --prefix {prefix} "
                f"--find-links {wheelhouse} -- "
                f"--simulated-gpus 'RTX 4090:2' --interface {interface} --backend userspace "
                f"--endpoint {provider_ip}:51820"
            )
            pipeline = command.replace("| sudo sh -s --", "| sh -s --") + " " + flags
            installed = subprocess.run(
                ["ip", "netns", "exec", ns, *CLEAN_ENV, "sh", "-c", pipeline],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert installed.returncode == 0, installed.stdout + installed.stderr
            joined = re.search(r"done: (node-\d+) joined the mesh at", installed.stdout)
            node = Node.objects.get(name=joined.group(1))

            # -- the machine appears on the open page, with its GPUs -------------------------
            card = page.locator(f"#node-{node.pk}")
            card.wait_for(timeout=15_000)
            assert page.evaluate("window.__sameDocument") is True
            assert node.name in card.inner_text() and node.mesh_address in card.inner_text()
            assert card.locator(".gpu-row").count() == 2
            assert card.locator(".gpu-row .model").all_inner_texts() == ["RTX 4090"] * 2
            assert card.locator(".badge.simulated").count() == 2
            assert card.locator("[data-status]").text_content() == "offline"
            assert not page.locator("#no-nodes").is_visible()
            page.screenshot(path=str(ARTIFACTS / "provider-node-joined.png"), full_page=True)

            # -- its agent starts: the card turns online ------------------------------------
            agent_log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115  (closed below)
            bed.popen(
                ns,
                [*CLEAN_ENV, str(prefix / "bin" / "clawnode"), "run", "--state-dir",
                 str(prefix / "state"), "--simulated-gpus", "RTX 4090:2"],
                stdout=agent_log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                expect(card.locator("[data-status]")).to_have_text("online", timeout=30_000)
            except Exception:
                print((tmp_path / "agent.log").read_text(), gateway.logs())
                raise
            assert page.evaluate("window.__sameDocument") is True
            wait_until(
                lambda: page.locator(f"#node-{node.pk} [data-age]").inner_text().endswith("s ago"),
                timeout=10,
                message="the heartbeat age to tick",
            )
            assert page.locator("#nodes-summary").inner_text() == "1 machine, 1 online"
            page.screenshot(path=str(ARTIFACTS / "provider-node-online.png"), full_page=True)

            # -- its GPUs go on sale from the node's page, then pause ------------------------
            with page.expect_navigation():
                page.click(f"#node-{node.pk} .node-actions a")
            assert page.locator("#gpu-models").inner_text().count("RTX 4090") == 1
            page.select_option("#id_gpu_model", "RTX 4090")
            page.fill("#id_gpu_count", "2")
            page.fill("#id_price_per_gpu_hour", "0.42")
            page.screenshot(path=str(ARTIFACTS / "provider-node-detail.png"), full_page=True)
            with page.expect_navigation():
                page.click("#create-listing")
            assert page.url == f"{base}/provider/listings/"
            listing = node.listings.get()
            assert (listing.gpu_count, listing.price_per_gpu_hour) == (2, 420_000)
            row = page.locator(f'tr[data-listing-id="{listing.pk}"]')
            assert "$0.42" in row.inner_text()
            with page.expect_navigation():
                row.locator("button.pause").click()
            assert page.locator(f'tr[data-listing-id="{listing.pk}"] .badge.paused').count() == 1
            listing.refresh_from_db()
            assert not listing.is_active
            page.screenshot(path=str(ARTIFACTS / "provider-listings.png"), full_page=True)
            agent_log.close()

    assert requested and all(url.startswith(base) for url in requested), requested
    # Chromium says it ignores Django's Cross-Origin-Opener-Policy header on plain http to an IP
    # that is not localhost (an "untrustworthy" origin, as the testbed's bridge address is).
    assert [e for e in console_errors if "Cross-Origin-Opener-Policy" not in e] == []
