"""A newcomer's first order on `make run`'s demo market, in the browser: the real `make run`
(web, worker, beat and, this machine being root with wireguard-go and nft, the demo nodes' REAL
clawnode daemons, each in a network namespace), the demo-buyer's printed password, an online
listing from the market page, one order, and the order page showing it running with how to
connect (the job address and the WireGuard config to download). The downloaded config, brought
up with wg-quick (wireguard-go) in a buyer namespace on the demo bridge, carries packets: the
buyer pings the node's address, the node pings the buyer's job address. The terminal stays
quiet, with the banner printed again once everything is up; Ctrl-C removes the namespaces,
wireguard-go processes and nft table."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS
from tests.integration.conftest import wait_until
from tests.integration.test_make_run import start_make_run
from tests.netns.testbed import Testbed, run

pytestmark = [pytest.mark.browser]

BRIDGE = "moltdemo0"  # scripts/demo_nodes.py's


def demo_leftovers() -> list[str]:
    """What of the real demo nodes exists on this machine: namespaces, bridge, nft table,
    wireguard-go processes and UAPI sockets of their interfaces."""
    found = [
        line.split()[0]
        for line in run("ip", "netns", "list").stdout.splitlines()
        if line.startswith("molt-demo-")
    ]
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        found.append(BRIDGE)
    if "molt_demo" in run("nft", "list", "tables").stdout:
        found.append("nft table ip molt_demo")
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if argv[:1] and argv[0].endswith(b"wireguard-go") and argv[1].startswith(b"mdemo"):
            found.append(f"wireguard-go {argv[1].decode()}")
    uapi = Path("/var/run/wireguard")
    found += [str(path) for path in uapi.glob("mdemo*.sock")] if uapi.is_dir() else []
    return found


def buyer_tunnel_carries_packets(agents_dir: Path, config: Path, text: str) -> None:
    """Bring `config` (the downloaded file) up in a buyer namespace on the demo bridge, with
    wg-quick (wireguard-go: no kernel WireGuard here), and ping across it both ways."""
    endpoint = re.search(r"^Endpoint = (\S+):(\d+)$", text, re.M).group(1)
    job_address = re.search(r"^Address = ([\d.]+)/32$", text, re.M).group(1)
    node_address = re.search(r"^AllowedIPs = ([\d.]+)/32", text, re.M).group(1)
    # The node the endpoint names: its namespace, from what seed_demo placed.
    (hostname,) = [
        path.parent.name
        for path in agents_dir.glob("*/real-node.json")
        if json.loads(path.read_text())["address"] == endpoint
    ]
    bed = Testbed(net="198.18.0", bridge_name=BRIDGE)
    try:
        buyer = bed.namespace("buy")
        bed.attach(buyer, host=250)
        iface = bed.wireguard_name("b")
        conf = config.parent / f"{iface}.conf"
        conf.write_text(text)
        conf.chmod(0o600)
        bed.exec(buyer, "wg-quick", "up", str(conf), timeout=60)
        pinged = bed.exec(buyer, "ping", "-c", "3", "-W", "2", node_address, check=False)
        assert pinged.returncode == 0, f"buyer -> node {node_address}: {pinged.stdout}"
        back = bed.exec(f"molt-demo-{hostname}", "ping", "-c", "1", "-W", "2", job_address,
                        check=False)  # fmt: skip
        assert back.returncode == 0, f"node -> buyer's job address {job_address}: {back.stdout}"
        # What crossed is WireGuard's: the buyer's peer counted the bytes.
        transfer = bed.exec(buyer, "wg", "show", iface, "transfer").stdout.split()
        assert int(transfer[1]) > 0 and int(transfer[2]) > 0, transfer
        bed.exec(buyer, "wg-quick", "down", str(conf), check=False)
    finally:
        bed.down()


def test_a_newcomers_first_order_on_make_run_reaches_running(tmp_path, browser_page):
    assert not demo_leftovers(), "another run's demo nodes are up: this test would remove them"
    with start_make_run(tmp_path) as run_:
        base, log_path, page = run_.base, run_.log_path, browser_page
        output = run_.output()
        password = re.search(r"demo-buyer\s+(\S+)", output).group(1)
        # This machine allows real daemons (root, /dev/net/tun, wireguard-go, nft): make run
        # must start them, not fall back.
        assert "demo nodes: REAL clawnode daemons" in output, output[-3000:]
        assert "SIMULATED" not in output

        # The market, as a newcomer first sees it: the demo nodes are online (no "show offline
        # nodes" needed) once their agents have connected.
        def online_rows() -> int:
            page.goto(f"{base}/")
            return page.locator("#listings tbody tr.listing:not(.offline)").count()

        wait_until(lambda: online_rows() == 10, timeout=90, message="10 online listings")
        # Their GPUs are simulated (no such GPU here), and the badge says so; nothing claims
        # their tunnels carry no traffic, as the simulated agents' pages do.
        badge = page.locator("#listings .badge.simulated").first
        expect(badge).to_have_attribute("title", re.compile("simulated GPUs"))
        assert "carry no traffic" not in page.content()

        # The first listing: log in from it (the printed password), order with the defaults.
        row = page.locator("#listings tbody tr.listing").first
        listing_id = row.get_attribute("data-listing-id")
        page.goto(f"{base}/accounts/login/?next=/listings/{listing_id}/")
        page.fill("#id_username", "demo-buyer")
        page.fill("#id_password", password)
        with page.expect_navigation(url=re.compile(rf"/listings/{listing_id}/$")):
            page.click("#login-submit")
        expect(page.locator("#no-ssh-keys")).to_have_count(0)
        order_button = page.locator("#order-button")
        expect(order_button).to_be_enabled()
        with page.expect_navigation(url=re.compile(r"/orders/\d+/$")):
            order_button.click()

        # The worker provisions it, the demo node's agent applies and acknowledges the peer:
        # running, pushed to the page, with the connection details.
        expect(page.locator("#order-state")).to_have_text("running", timeout=60_000)
        expect(page.locator("#job-address")).to_have_text(re.compile(r"^10\.\d+\.\d+\.\d+$"))
        expect(page.locator("#key-status")).to_have_text(re.compile("^held in this browser"))
        with page.expect_download() as download_info:
            page.click("#download-config")
        config = tmp_path / "order.conf"
        download_info.value.save_as(str(config))
        text = config.read_text()
        assert re.search(r"^PrivateKey = \S+$", text, re.M), text
        # The node's namespace address on the demo bridge, where its wireguard-go listens.
        assert re.search(r"^Endpoint = 198\.18\.0\.\d+:51820$", text, re.M), text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "make-run-first-order.png"), full_page=True)
        buyer_tunnel_carries_packets(tmp_path / "demo-agents", config, text)

        # The terminal, as the newcomer reads it (issue 12 item 9): the banner again once the
        # start-up lines are done; a line per request; worker and beat quiet at their default
        # (warnings and errors), where at info beat alone prints a line every few seconds.
        # The banner is printed 2 s after the last agent connected; on a quiet machine the order
        # can be running before that (CI saw the whole flow take under 2 s), so wait for it.
        up = "demo agents are up; Ctrl-C stops them all."
        wait_until(lambda: up in log_path.read_text(), timeout=60, message="the second banner")
        output = log_path.read_text()
        assert re.search(r'"GET /orders/\d+/ HTTP/1.1" 200', output)
        assert "Sending due task" not in output and "succeeded in" not in output
        # Nothing of the start-up after the banner's second printing: no Celery banner at all,
        # no agent's first state applied.
        after = output.split(up, 1)[1]
        assert "celery@" not in output and "revision 0 applied" not in after, after[:3000]

        # Ctrl-C (honcho's SIGTERM to each process): the daemons stop and everything of the
        # real nodes is removed.
        make = run_.process
        assert demo_leftovers(), "the real nodes' namespaces were never there"
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=60)
        assert demo_leftovers() == []
        assert "demo nodes: stopped; namespaces, wireguard-go and nft rules removed" in (
            log_path.read_text()
        )
