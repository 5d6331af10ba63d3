"""A rental end to end with real parts only: the ASGI server, a Celery worker, Redis and
PostgreSQL in the root namespace; `clawnode join` and `clawnode run` with wireguard-go in a
provider namespace; buyers in their own namespaces applying the downloaded wg-quick config with
wireguard-tools. Packets cross the tunnel, isolation holds against a buyer who widens its own
AllowedIPs, the bill equals what WireGuard counted, and stop tears it all down and settles."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import LedgerEntry, Order, Settlement
from marketplace.tokens import issue_api_token
from meshnet.enrolment import create_enrollment_token
from meshnet.models import Node
from tests.integration.conftest import running_gateway, wait_until
from tests.integration.test_order_provisioning import call
from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

BIN = Path(sys.executable).parent
BLOB_SIZE = 2 * 1024 * 1024


def can_reach(bed, ns: str, address: str) -> bool:
    return bed.exec(ns, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def drops(bed, ns: str) -> dict[str, int]:
    """Packets counted by each drop rule of the agent's table: {rule text: packets}."""
    listing = bed.exec(ns, "nft", "list", "table", "inet", "clawnode").stdout
    return {
        m.group(1).strip(): int(m.group(2))
        for m in re.finditer(r"^\s*(.*?) counter packets (\d+) bytes \d+ drop$", listing, re.M)
    }


def provider_counters(bed, ns: str, iface: str, key: str) -> tuple[int, int] | None:
    """(rx, tx) that the provider's WireGuard counted for the buyer's peer, None once gone."""
    for line in bed.exec(ns, "wg", "show", iface, "transfer").stdout.splitlines():
        peer, rx, tx = line.split("\t")
        if peer == key:
            return int(rx), int(tx)
    return None


def wg_keypair(bed, ns: str) -> tuple[str, str]:
    private = bed.exec(ns, "wg", "genkey").stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


def order_tunnel(gateway, token, listing, public_key) -> int:
    status, body = call(
        gateway, "POST", "/api/v1/orders/", token,
        {"listing": listing.pk, "gpu_count": 1, "hours": 1, "wireguard_public_key": public_key},
    )  # fmt: skip
    assert status == 201, body
    order_id = json.loads(body)["id"]
    wait_until(
        lambda: Order.objects.filter(pk=order_id, state="running").exists(),
        timeout=30,
        message=f"order {order_id} to run\n{gateway.logs()}",
    )
    return order_id


def bring_up_buyer(bed, gateway, token, order_id, ns, iface, private_key, workdir) -> str:
    """Download wireguard.conf, fill in the private key only the buyer holds, wg-quick up."""
    status, config = call(gateway, "GET", f"/api/v1/orders/{order_id}/wireguard.conf", token)
    assert status == 200, config
    assert private_key not in config
    filled = re.sub(r"^# PrivateKey = .*$", f"PrivateKey = {private_key}", config, flags=re.M)
    path = workdir / f"{iface}.conf"
    path.write_text(filled)
    path.chmod(0o600)
    bed.exec(ns, "wg-quick", "up", str(path), timeout=60)
    return config


def test_a_rental_end_to_end_over_a_real_wireguard_tunnel(tmp_path, settings):
    User = get_user_model()
    provider = User.objects.create_user("bob", password="bob-pass-123")
    alice = User.objects.create_user("alice", password="alice-pass-123")
    carol = User.objects.create_user("carol", password="carol-pass-123")

    with network_testbed() as bed:
        prov, buyer, buyer2, lan = (bed.namespace(r) for r in ("prov", "buy", "byb", "lan"))
        prov_ip = bed.attach(prov)
        bed.attach(buyer)
        bed.attach(buyer2)
        # The provider's LAN: a host the buyer must never reach, routed back through the
        # provider, which forwards packets like a home router would.
        bed.link(prov, "203.0.113.1/24", lan, "203.0.113.2/24", "lan")
        bed.exec(lan, "ip", "route", "add", "10.100.128.0/17", "via", "203.0.113.1")
        # ...and to the buyers' job addresses, so only the provider's rules keep them out.
        bed.exec(lan, "ip", "route", "add", "10.64.0.0/11", "via", "203.0.113.1")
        bed.exec(prov, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        prov_if = bed.wireguard_name("p")
        buyer_if, buyer2_if = bed.wireguard_name("b"), bed.wireguard_name("c")

        with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
            # -- the provider joins and runs the agent --------------------------------------
            state_dir = tmp_path / "clawnode"
            token = create_enrollment_token(provider).token
            joined = bed.exec(
                prov, str(BIN / "clawnode"), "join", "--gateway", gateway.base_url, "--insecure",
                "--token", token, "--state-dir", str(state_dir), "--interface", prov_if,
                "--endpoint", f"{prov_ip}:51820", "--backend", "userspace",
                "--simulated-gpus", "RTX 4090:2", timeout=60,
            )  # fmt: skip
            match = re.search(r"(node-\d+) joined the mesh at (10\.100\.\d+\.\d+)", joined.stdout)
            assert match, joined.stdout + joined.stderr
            node = Node.objects.get(name=match.group(1))
            mesh_ip = match.group(2)
            agent_log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115

            def start_agent():
                return bed.popen(
                    prov,
                    [str(BIN / "clawnode"), "run", "--state-dir", str(state_dir),
                     "--simulated-gpus", "RTX 4090:2"],
                    stdout=agent_log, stderr=subprocess.STDOUT,
                )  # fmt: skip

            agent = start_agent()
            wait_until(
                lambda: Node.objects.get(pk=node.pk).online,
                timeout=30,
                message=f"the agent to connect\n{(tmp_path / 'agent.log').read_text()}",
            )
            www = tmp_path / "www"
            www.mkdir()
            (www / "blob").write_bytes(bytes(range(256)) * (BLOB_SIZE // 256))
            bed.popen(
                prov,
                [sys.executable, "-m", "http.server", "8080", "--bind", mesh_ip,
                 "--directory", str(www)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip

            listing = create_listing(
                provider, node=node, gpu_count=2, price_per_gpu_hour=3_600_000,
                price_per_gib=2_000_000,
            )  # fmt: skip
            ledger.grant_credits(alice, 500_000_000)
            ledger.grant_credits(carol, 500_000_000)
            alice_token, carol_token = issue_api_token(alice), issue_api_token(carol)

            # -- two buyers rent a GPU each and bring their tunnels up ------------------------
            alice_private, alice_public = wg_keypair(bed, buyer)
            carol_private, carol_public = wg_keypair(bed, buyer2)
            alice_order = order_tunnel(gateway, alice_token, listing, alice_public)
            carol_order = order_tunnel(gateway, carol_token, listing, carol_public)
            bring_up_buyer(bed, gateway, alice_token, alice_order, buyer, buyer_if,
                           alice_private, tmp_path)  # fmt: skip
            bring_up_buyer(bed, gateway, carol_token, carol_order, buyer2, buyer2_if,
                           carol_private, tmp_path)  # fmt: skip
            carol_job = Order.objects.get(pk=carol_order).job_peer.address

            # -- packets cross the tunnel: ping and an HTTP download ------------------------
            assert can_reach(bed, buyer, mesh_ip)
            assert can_reach(bed, buyer2, mesh_ip)
            fetched = bed.exec(
                buyer, sys.executable, "-c",
                f"import urllib.request; print(len(urllib.request.urlopen("
                f"'http://{mesh_ip}:8080/blob', timeout=20).read()))",
                timeout=60,
            )  # fmt: skip
            assert int(fetched.stdout) == BLOB_SIZE

            # -- isolation: alice widens her own AllowedIPs and routes; the provider drops --
            prov_public = node.wireguard_public_key
            bed.exec(buyer, "wg", "set", buyer_if, "peer", prov_public, "allowed-ips",
                     f"{mesh_ip}/32,{carol_job}/32,203.0.113.0/24")  # fmt: skip
            bed.exec(buyer, "ip", "route", "add", f"{carol_job}/32", "dev", buyer_if)
            bed.exec(buyer, "ip", "route", "add", "203.0.113.0/24", "dev", buyer_if)
            before = drops(bed, prov)
            assert not can_reach(bed, buyer, carol_job), "reached another buyer's job address"
            assert not can_reach(bed, buyer, "203.0.113.2"), "reached a host on the provider's LAN"
            assert not can_reach(bed, buyer, "203.0.113.1"), "reached the provider's LAN address"
            after = drops(bed, prov)
            forward_rule = f'iifname "{prov_if}"'
            input_rule = f'iifname "{prov_if}" ip daddr != {mesh_ip}'
            assert after[forward_rule] > before[forward_rule]  # carol's job and the LAN host
            assert after[input_rule] > before[input_rule]  # the provider's own LAN address
            # The same probe without the agent's table gets through: the rules are what stop it.
            bed.exec(prov, "nft", "delete", "table", "inet", "clawnode")
            assert can_reach(bed, buyer, "203.0.113.2")

            # -- the agent restarts mid-job: tunnel stays, the table comes back, bytes go on --
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=20) == 0
            assert can_reach(bed, buyer, mesh_ip), "the tunnel must outlive the agent"
            agent = start_agent()
            wait_until(lambda: "clawnode" in bed.exec(prov, "nft", "list", "tables").stdout,
                       timeout=20, message="the restarted agent to restore isolation")  # fmt: skip
            assert not can_reach(bed, buyer, "203.0.113.2")
            assert can_reach(bed, buyer, mesh_ip)

            # -- quiesce alice's tunnel, then stop: the bill equals WireGuard's count --------
            bed.exec(buyer, "ip", "link", "set", buyer_if, "down")
            # Wait out WireGuard's passive keepalive (10 s after the last received packet), so
            # the provider's counters are final before the stop.
            time.sleep(12)
            counted = provider_counters(bed, prov, prov_if, alice_public)
            assert counted is not None and counted[0] > BLOB_SIZE // 64 and counted[1] > BLOB_SIZE
            status, body = call(
                gateway, "POST", f"/api/v1/orders/{alice_order}/stop/", alice_token, {}
            )
            assert status == 200, body
            done = wait_until(
                lambda: Order.objects.filter(pk=alice_order, state="completed").first(),
                timeout=40,
                message=f"the stop to complete\n{(tmp_path / 'agent.log').read_text()}",
            )
            assert provider_counters(bed, prov, prov_if, alice_public) is None  # peer gone
            assert (done.bytes_out, done.bytes_in) == counted  # rx from alice = her bytes out
            bed.exec(buyer, "ip", "link", "set", buyer_if, "up")
            assert not can_reach(bed, buyer, mesh_ip), "traffic must stop after the stop"
            assert can_reach(bed, buyer2, mesh_ip), "carol's job is untouched"

            # -- the money: capture + fee + release account for the hold, exactly once -------
            settlement = Settlement.objects.get(order_id=alice_order)
            assert settlement.bandwidth_bytes == sum(counted)
            assert settlement.captured + settlement.released == done.hold_amount
            assert settlement.fee + settlement.provider_amount == settlement.captured
            legs = sorted(
                LedgerEntry.objects.filter(transaction=settlement.transaction).values_list(
                    "account__kind", "amount"
                )
            )
            assert sum(amount for _, amount in legs) == 0
            assert ("escrow", -done.hold_amount) in legs
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=20)
            bed.exec(buyer, "wg-quick", "down", str(tmp_path / f"{buyer_if}.conf"), check=False)
            bed.exec(buyer2, "wg-quick", "down", str(tmp_path / f"{buyer2_if}.conf"), check=False)
