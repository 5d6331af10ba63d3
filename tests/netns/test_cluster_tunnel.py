"""A multi-node order's one tunnel with real parts only: two providers' nodes in their own
namespaces (`clawnode join` and `clawnode run` with wireguard-go), one order on both through
/api/v1/clusters/, and the buyer bringing up the ONE downloaded wg-quick file (one interface,
one peer per node) with wireguard-tools: one address, one key, both nodes reached through it;
stop removes the buyer's peer from both nodes and the tunnel goes dead on both."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.tokens import issue_api_token
from meshnet.enrolment import create_enrollment_token
from meshnet.models import JobPeer, Node
from tests.integration.conftest import running_gateway, wait_until
from tests.integration.test_order_provisioning import call
from tests.netns.test_rental_e2e import can_reach, provider_counters, wg_keypair
from tests.netns.testbed import network_testbed

pytestmark = [pytest.mark.netns, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

BIN = Path(sys.executable).parent


def test_one_wg_quick_file_reaches_both_nodes_of_a_multi_node_order(tmp_path, settings):
    User = get_user_model()
    bob = User.objects.create_user("bob", password="bob-pass-123")
    dora = User.objects.create_user("dora", password="dora-pass-123")
    alice = User.objects.create_user("alice", password="alice-pass-123")

    with network_testbed() as bed:
        provs = [bed.namespace(r) for r in ("pa", "pb")]
        buyer = bed.namespace("buy")
        prov_ips = [bed.attach(ns) for ns in provs]
        bed.attach(buyer)
        ifaces = [bed.wireguard_name("a"), bed.wireguard_name("d")]
        buyer_if = bed.wireguard_name("b")
        agents: list[subprocess.Popen] = []

        with running_gateway(tmp_path, settings, host=bed.gateway_ip) as gateway:
            nodes, meshes, listings = [], [], []
            for i, (ns, ip, iface, owner) in enumerate(
                zip(provs, prov_ips, ifaces, (bob, dora), strict=True)
            ):
                state_dir = tmp_path / f"clawnode-{i}"
                joined = bed.exec(
                    ns, str(BIN / "clawnode"), "join", "--gateway", gateway.base_url,
                    "--insecure", "--token", create_enrollment_token(owner).token,
                    "--state-dir", str(state_dir), "--interface", iface,
                    "--endpoint", f"{ip}:51820", "--backend", "userspace",
                    "--simulated-gpus", "RTX 4090:2", timeout=60,
                )  # fmt: skip
                match = re.search(
                    r"(node-\d+) joined the mesh at (10\.\d+\.\d+\.\d+)", joined.stdout
                )
                assert match, joined.stdout + joined.stderr
                node = Node.objects.get(name=match.group(1))
                log = open(tmp_path / f"agent-{i}.log", "ab")  # noqa: SIM115
                agents.append(
                    bed.popen(
                        ns,
                        [
                            str(BIN / "clawnode"),
                            "run",
                            "--state-dir",
                            str(state_dir),
                            "--simulated-gpus",
                            "RTX 4090:2",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
                wait_until(
                    lambda node=node: Node.objects.get(pk=node.pk).online,
                    timeout=30,
                    message=f"agent {i} to connect\n{(tmp_path / f'agent-{i}.log').read_text()}",
                )
                nodes.append(node)
                meshes.append(match.group(2))
                listings.append(
                    create_listing(
                        owner,
                        node=node,
                        gpu_count=2,
                        price_per_gpu_hour=3_600_000,
                        price_per_gib=2_000_000,
                    )
                )
            ledger.grant_credits(alice, 500_000_000)
            token = issue_api_token(alice)
            private, public = wg_keypair(bed, buyer)

            status, body = call(
                gateway, "POST", "/api/v1/clusters/", token,
                {"parts": [{"listing": lst.pk, "gpu_count": 1} for lst in listings],
                 "hours": 1, "on_part_loss": "end", "wireguard_public_key": public},
            )  # fmt: skip
            assert status == 201, body
            cluster_id = json.loads(body)["id"]
            wait_until(
                lambda: Order.objects.filter(cluster_id=cluster_id, state="running").count() == 2,
                timeout=40,
                message=f"both parts to run\n{gateway.logs()}",
            )
            # One key and one address on both nodes, as their WireGuard has it.
            (address,) = set(
                JobPeer.objects.filter(ref__startswith="order:").values_list("address", flat=True)
            )
            for ns, iface in zip(provs, ifaces, strict=True):
                assert provider_counters(bed, ns, iface, public) is not None

            status, config = call(
                gateway, "GET", f"/api/v1/clusters/{cluster_id}/wireguard.conf", token
            )
            assert status == 200, config
            assert config.count("[Interface]") == 1
            assert f"Address = {address}/32" in config
            for node, mesh in zip(nodes, meshes, strict=True):
                assert f"PublicKey = {node.wireguard_public_key}\nAllowedIPs = {mesh}/32" in config
            filled = re.sub(r"^# PrivateKey = .*$", f"PrivateKey = {private}", config, flags=re.M)
            path = tmp_path / f"{buyer_if}.conf"
            path.write_text(filled)
            path.chmod(0o600)
            bed.exec(buyer, "wg-quick", "up", str(path), timeout=60)

            # -- one tunnel, both nodes ------------------------------------------------------
            for mesh in meshes:
                assert can_reach(bed, buyer, mesh), f"the one tunnel does not reach {mesh}"

            # -- stop: the buyer's peer leaves both nodes, the tunnel is dead on both ---------
            status, body = call(gateway, "POST", f"/api/v1/clusters/{cluster_id}/stop/", token, {})
            assert status == 200, body
            wait_until(
                lambda: (
                    not Order.objects.filter(cluster_id=cluster_id)
                    .exclude(state="completed")
                    .exists()
                ),
                timeout=40,
                message=f"both parts to complete\n{gateway.logs()}",
            )
            for ns, iface in zip(provs, ifaces, strict=True):
                assert provider_counters(bed, ns, iface, public) is None
            for mesh in meshes:
                assert not can_reach(bed, buyer, mesh), "traffic must stop after the stop"
            for agent in agents:
                agent.terminate()
                agent.wait(timeout=20)
            bed.exec(buyer, "wg-quick", "down", str(path), check=False)
