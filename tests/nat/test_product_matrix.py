"""The product across the NAT lab: provider NAT kinds against buyer NAT kinds with MOLT itself.

tests/nat/test_wireguard_matrix.py proves what plain WireGuard can do with the test playing the
coordinator; this one runs what a provider and a buyer run. In the lab's services network: the
gateway (uvicorn, a Celery worker and a redis-server of its own, tests/nat/services.py), the hub
(`manage.py run_hub`) and one relay (`python -m meshnet.relay`, asking the gateway's control API
for its pairs with its token, as deployed). Per cell: the provider's site runs `clawnode join`
then the `clawnode run` daemon (userspace wireguard-go backend, nftables firewall), with no
--endpoint anywhere (the public provider declares its own address by itself: it holds the address
the gateway sees it at; one behind a NAT declares nothing); a listing on the node; the
buyer's site places the order through the API, downloads its wg-quick file and brings it up with
Debian's `wg-quick` (WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go). The buyer pings the node's
tunnel address and moves 8 MB to it; the cell records the order's `path` from the API, the
endpoint the buyer's WireGuard ended up sending to, and the time from the order's POST to the
first handshake the buyer's `wg` shows (recorded, never asserted).

What the product does (docs/nat.md, "Which orders are relayed", "Upgrading a relayed path"):
with MOLT_RELAY_MODE=nat a node that declared no endpoint starts every order on a relay (a stock
client's endpoint is fixed by its file) and a public one goes direct; a relayed order then tries
the direct path once (the node sends to the buyer's mapping as the hub saw it) and goes direct
when the buyer's client roamed to the node and the relay carried nothing of the pair for
UPGRADE_QUIET_SECONDS. The roam needs the buyer's NAT to let the node's packets in: a public or
endpoint-independent-filtering (full-cone) buyer. So each cell asserts: traffic passes; at first
`path` is direct exactly for the public provider, else relayed via the lab's relay, and the
buyer's WireGuard sends where the path says (the provider's public address, or the relay's buyer
port); and a relayed cell whose buyer is public or full-cone ends direct within
UPGRADE_BOUND_S, by the order's `path` and the buyer's endpoint, and still pings (those cells
are kept up and waited for after the others ran, so their waits overlap; MOLT_NAT_UPGRADE=0
skips it).

CI runs the representative cells of CI_CELLS; MOLT_NAT_FULL_MATRIX=1 runs every provider kind
against every buyer kind and the hairpin cell. The table is printed (-s) and written to
test-artifacts/nat/product-matrix.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from marketplace import ledger
from marketplace.listings import create_listing
from marketplace.models import Order
from marketplace.tokens import issue_api_token
from meshnet import relays
from meshnet.enrolment import create_enrollment_token
from meshnet.models import JobPeer, Node, Relay
from tests.nat import lab as nat_lab
from tests.nat import relayed
from tests.nat.services import BIN, HUB_ENDPOINT, Hub, LabGateway, wait_for

pytestmark = [pytest.mark.nat, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "nat"
PAYLOAD = 8 * 1024 * 1024
RELAY_NAME = "lab-1"
# Public provider; each mapping kind on each side (symmetric = endpoint-dependent); each
# filtering kind; a pair no punch can open (both endpoint-dependent); double NAT; hairpin.
CI_CELLS = (
    ("public", "symmetric"),
    ("full-cone", "public"),
    ("restricted-cone", "full-cone"),
    ("port-restricted", "restricted-cone"),
    ("symmetric", "symmetric"),
    ("double", "port-restricted"),
    ("hairpin", "hairpin"),
)
FULL = os.environ.get("MOLT_NAT_FULL_MATRIX") == "1"
# Wait for and assert the upgrade of relayed cells to direct (docs/nat.md, "The upgrade"); the
# wait is a minute or two after the last cell. MOLT_NAT_UPGRADE=0 skips it.
UPGRADE = os.environ.get("MOLT_NAT_UPGRADE", "1") != "0"
# The bound on a relayed order's upgrade to direct, from its POST: the product's own give-up
# (UPGRADE_GIVE_UP_SECONDS after the upgrade started, which is at the relay's first poll once the
# hub saw the buyer's mapping) plus room for that start. Past it the product has given up.
UPGRADE_BOUND_S = relays.UPGRADE_GIVE_UP_SECONDS + 30
# After `path` reads direct, the buyer's client must have roamed to the node, or do so on the
# node's next keepalive (25 s).
ROAM_S = 30
UPGRADES_THROUGH = ("public", "full-cone")  # buyer kinds whose NAT lets the node's packets in

# The buyer's API calls go from its own site through its NAT, as a buyer's would.
API = r"""
import json, sys, time, urllib.error, urllib.request
method, url, token, body = sys.argv[1:5]
request = urllib.request.Request(url, method=method, data=body.encode() if body else None,
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        status, text = response.status, response.read().decode()
except urllib.error.HTTPError as exc:
    status, text = exc.code, exc.read().decode()
print(json.dumps({"status": status, "text": text}))
"""


@dataclass
class Cell:
    provider: str
    buyer: str
    path: str = ""
    relay: str | None = None
    buyer_endpoint: str = ""  # where the buyer's WireGuard sends, as its `wg` shows
    first_handshake_s: float | None = None  # from the order's POST
    pinged: bool = False
    moved: int = 0
    upgraded_s: float | None = None  # from the order's POST to `path` direct, if it upgraded
    upgraded_endpoint: str = ""
    upgraded_pinged: bool = False
    error: str = ""

    @property
    def expects_upgrade(self) -> bool:
        return self.provider not in ("public", "hairpin") and self.buyer in UPGRADES_THROUGH

    @property
    def label(self) -> str:
        if self.first_handshake_s is None:
            return "FAILED"
        via = f" via {self.relay}" if self.relay else ""
        ok = "" if self.pinged and self.moved == PAYLOAD else " NO TRAFFIC"
        upgrade = f", direct after {self.upgraded_s:.0f}s" if self.upgraded_s is not None else ""
        return f"{self.path}{via} {self.first_handshake_s:.1f}s{ok}{upgrade}"


def cells() -> list[tuple[str, str]]:
    # MOLT_NAT_CELLS="port-restricted:restricted-cone,double:public" runs just those cells.
    chosen = os.environ.get("MOLT_NAT_CELLS", "")
    if chosen:
        return [tuple(cell.split(":", 1)) for cell in chosen.split(",")]  # type: ignore[misc]
    if not FULL:
        return list(CI_CELLS)
    names = [kind.name for kind in nat_lab.KINDS]
    return [(p, b) for p in names for b in names] + [("hairpin", "hairpin")]


class Site:
    """A buyer in its lab site: API calls and wg-quick from its namespace."""

    def __init__(self, lab: nat_lab.Lab, ns: str, gateway: LabGateway, token: str) -> None:
        self.lab, self.ns, self.gateway, self.token = lab, ns, gateway, token

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        done = self.lab.exec(
            self.ns, sys.executable, "-c", API, method, self.gateway.url + path, self.token,
            json.dumps(body) if body is not None else "", timeout=60,
        )  # fmt: skip
        answer = json.loads(done.stdout)
        try:
            return answer["status"], json.loads(answer["text"])
        except ValueError:
            return answer["status"], answer["text"]


def _provider(lab, gateway, owner, host, kind: nat_lab.Kind, tmp_path: Path) -> Node:
    """`clawnode join` and `clawnode run` in the provider's site; the node once it reported."""
    state_dir = tmp_path / f"clawnode-{host.ns}"
    # No --endpoint, public or not: the install line's join. A public machine holds the
    # address the gateway sees it at and declares it itself (cli.cmd_join).
    joined = lab.exec(
        host.ns, str(BIN / "clawnode"), "join", "--gateway", gateway.url, "--insecure",
        "--token", create_enrollment_token(owner).token, "--state-dir", str(state_dir),
        "--interface", lab.wireguard_name("p"), "--backend", "userspace",
        "--simulated-gpus", "RTX 4090:1", timeout=60,
    )  # fmt: skip
    match = re.search(r"(node-\d+) joined the mesh", joined.stdout)
    assert match, joined.stdout + joined.stderr
    declared = Node.objects.get(name=match.group(1)).declared_endpoint
    assert declared == (f"{host.address}:51820" if kind.public else ""), joined.stdout
    log = open(tmp_path / f"agent-{host.ns}.log", "wb")  # noqa: SIM115  (the child holds it)
    lab.popen(
        host.ns,
        [str(BIN / "clawnode"), "run", "--state-dir", str(state_dir),
         "--simulated-gpus", "RTX 4090:1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    node = Node.objects.get(name=match.group(1))
    reported, _ = wait_for(lambda: node.gpus.exists(), 60)
    assert reported, (tmp_path / f"agent-{host.ns}.log").read_text()[-3000:]
    return node


def _handshake(lab, ns: str, iface: str, key: str) -> bool:
    """Whether the buyer's `wg` shows a handshake with the provider's key."""
    out = lab.exec(ns, "wg", "show", iface, "latest-handshakes", check=False).stdout
    seen = dict(line.split("\t") for line in out.splitlines())
    return seen.get(key, "0") != "0"


@dataclass
class Pending:
    """A relayed cell kept up until its upgrade to direct is decided."""

    cell: Cell
    buyer: Site
    order_id: int
    posted: float
    node_key: str
    target: str
    iface: str
    conf: Path
    namespaces: list[str]


def run_cell(
    lab,
    gateway,
    users,
    provider_name: str,
    buyer_name: str,
    tmp_path: Path,
    pending: list,
    keep: bool = False,
) -> Cell:
    """One cell; a relayed one that should upgrade (or any, with `keep`) is left up and
    appended to `pending`."""
    cell = Cell(provider_name, buyer_name)
    owner, buyer_user = users
    before = set(lab.namespaces)
    if provider_name == "hairpin":
        p_host, b_host = lab.site(nat_lab.HAIRPIN_SITE, nat_lab.PROVIDER_NET, ["p", "b"])
        p_kind = nat_lab.HAIRPIN_SITE
    else:
        p_kind = nat_lab.KINDS_BY_NAME[provider_name]
        (p_host,) = lab.site(p_kind, nat_lab.PROVIDER_NET, ["p"])
        (b_host,) = lab.site(nat_lab.KINDS_BY_NAME[buyer_name], nat_lab.BUYER_NET, ["b"])
    iface = lab.wireguard_name("b")
    conf = tmp_path / f"{iface}.conf"
    try:  # errors are the cell's result; the sites go in every case but a kept cell's
        node = _provider(lab, gateway, owner, p_host, p_kind, tmp_path)
        listing = create_listing(
            owner, node=node, gpu_count=1, price_per_gpu_hour=3_600_000, price_per_gib=2_000_000
        )
        buyer = Site(lab, b_host.ns, gateway, issue_api_token(buyer_user))
        private = lab.exec(b_host.ns, "wg", "genkey").stdout.strip()
        public = nat_lab.run("wg", "pubkey", stdin=private + "\n").stdout.strip()
        posted = time.monotonic()
        status, body = buyer.api(
            "POST", "/api/v1/orders/",
            {"listing": listing.pk, "gpu_count": 1, "hours": 1, "wireguard_public_key": public},
        )  # fmt: skip
        assert status == 201, body
        order_id = body["id"]
        running, _ = wait_for(
            lambda: Order.objects.filter(pk=order_id, state="running").exists(), 60
        )
        assert running, f"order not running: {Order.objects.filter(pk=order_id).values().first()}"
        status, text = buyer.api("GET", f"/api/v1/orders/{order_id}/wireguard.conf")
        assert status == 200, text
        filled = re.sub(r"^# PrivateKey = .*$", f"PrivateKey = {private}", str(text), flags=re.M)
        assert f"PrivateKey = {private}" in filled, text
        conf.write_text(filled)
        conf.chmod(0o600)
        lab.exec(b_host.ns, "env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
                 "wg-quick", "up", str(conf), timeout=60)  # fmt: skip
        shook, _ = wait_for(
            lambda: _handshake(lab, b_host.ns, iface, node.wireguard_public_key), 30
        )
        if shook:
            cell.first_handshake_s = time.monotonic() - posted
        else:
            _diagnose(lab, tmp_path, cell, [(b_host.ns, iface), (p_host.ns, None)])
        status, body = buyer.api("GET", f"/api/v1/orders/{order_id}/")
        assert status == 200, body
        cell.path = body["path"]["kind"]
        cell.relay = body["path"]["relay"]
        ends = lab.exec(b_host.ns, "wg", "show", iface, "endpoints").stdout
        cell.buyer_endpoint = dict(line.split("\t") for line in ends.splitlines()).get(
            node.wireguard_public_key, ""
        )
        target = body["provider_address"]
        cell.pinged = (
            lab.exec(b_host.ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)
            .returncode == 0
        )  # fmt: skip
        if cell.pinged:
            moved = relayed.move_bytes(lab, b_host.ns, p_host.ns, target, PAYLOAD)
            cell.moved = moved["received"]
        if keep or (UPGRADE and cell.expects_upgrade and cell.path == "relayed"):
            pending.append(
                Pending(cell, buyer, order_id, posted, node.wireguard_public_key, target, iface,
                        conf, [ns for ns in lab.namespaces if ns not in before])
            )  # fmt: skip
            return cell
        buyer.api("POST", f"/api/v1/orders/{order_id}/stop/", {})
    except (AssertionError, RuntimeError, subprocess.TimeoutExpired) as exc:
        cell.error = str(exc)[-2000:]
    _close(lab, b_host.ns, conf, [ns for ns in lab.namespaces if ns not in before])
    return cell


def _diagnose(lab, tmp_path: Path, cell: Cell, sites: list[tuple[str, str | None]]) -> None:
    """What a cell without a handshake looked like: each side's WireGuard, the relay's pairs, and
    the relay host's conntrack (written next to the agents' logs)."""
    out = [f"# {cell.provider} x {cell.buyer}"]
    for ns, iface in sites:
        shown = lab.exec(ns, "wg", "show", *([iface] if iface else ["all"]), check=False)
        out += [f"## wg in {ns}", shown.stdout + shown.stderr]
    status = tmp_path / "relay" / "status.json"
    out += ["## relay status", status.read_text() if status.exists() else "(none)"]
    listed = nat_lab.run("ip", "netns", "list").stdout.split()
    for ns in listed:
        if ns.startswith("nrelay") and ns.endswith(lab.suffix):
            tracked = lab.exec(ns, "conntrack", "-L", check=False)
            out += [f"## conntrack in {ns}", tracked.stdout + tracked.stderr]
    name = f"diagnosis-{cell.provider}-{cell.buyer}.txt"
    (tmp_path / name).write_text("\n".join(out))


def _close(lab, buyer_ns: str, conf: Path, namespaces: list[str]) -> None:
    lab.exec(buyer_ns, "wg-quick", "down", str(conf), check=False)
    lab.release(namespaces)


def settle(lab, waiting: list[Pending]) -> None:
    """Wait (up to UPGRADE_BOUND_S after the last cell) for each kept cell's order to read
    `direct`; record when, where the buyer's WireGuard then sends, and a ping; close them."""
    deadline = time.monotonic() + UPGRADE_BOUND_S
    left = list(waiting)
    while left and time.monotonic() < deadline:
        for item in list(left):
            status, body = item.buyer.api("GET", f"/api/v1/orders/{item.order_id}/")
            if status == 200 and body["path"]["kind"] == "direct":
                item.cell.upgraded_s = time.monotonic() - item.posted
                left.remove(item)
        time.sleep(1)
    for item in waiting:
        try:
            ns = item.buyer.ns
            ends = lab.exec(ns, "wg", "show", item.iface, "endpoints").stdout
            item.cell.upgraded_endpoint = dict(line.split("\t") for line in ends.splitlines()).get(
                item.node_key, ""
            )
            item.cell.upgraded_pinged = (
                lab.exec(ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", item.target, check=False)
                .returncode == 0
            )  # fmt: skip
            item.buyer.api("POST", f"/api/v1/orders/{item.order_id}/stop/", {})
        finally:
            _close(lab, item.buyer.ns, item.conf, item.namespaces)


def table(found: list[Cell]) -> str:
    rows = [f"{'provider':<16} {'buyer':<16} result"]
    rows += [f"{c.provider:<16} {c.buyer:<16} {c.label}" for c in found]
    return "\n".join(rows)


@contextlib.contextmanager
def product(lab, settings, tmp_path: Path):
    """The market in the lab's services network: a provider and a buyer with credit, the
    gateway (with a Celery worker), the hub, and the relay on the gateway's control API;
    yields ((owner, buyer), gateway, the lab's relay) once the relay has polled."""
    settings.MOLT_HUB_ENDPOINT = HUB_ENDPOINT
    User = get_user_model()
    owner = User.objects.create_user("prov", password="prov-pass-123")
    buyer_user = User.objects.create_user("buyer", password="buyer-pass-123")
    ledger.grant_credits(buyer_user, 10_000_000_000)
    the_relay = Relay.objects.create(name=RELAY_NAME, address=relayed.RELAY_ADDRESS)
    token = relays.issue_relay_token(the_relay)
    gateway = LabGateway(lab, settings, tmp_path, worker=True, extra_env={"MOLT_RELAY_MODE": "nat"})
    hub = Hub(lab, settings, tmp_path)
    try:
        control = (f"{gateway.url}/api/v1/relay/pairs/", token)
        with relayed.relay(lab, tmp_path / "relay", control=control) as lab_relay:
            live, _ = wait_for(lambda: relays.live_relays().filter(pk=the_relay.pk).exists(), 30)
            assert live, f"the relay never polled the gateway:\n{gateway.logs()}"
            yield (owner, buyer_user), gateway, lab_relay
    finally:
        hub.stop()
        gateway.stop()


def test_product_matrix(lab, settings, tmp_path):
    started = time.monotonic()
    found: list[Cell] = []
    waiting: list[Pending] = []
    with product(lab, settings, tmp_path) as (users, gateway, _):
        for provider_name, buyer_name in cells():
            found.append(
                run_cell(lab, gateway, users, provider_name, buyer_name, tmp_path, waiting)
            )
        settle(lab, waiting)
    elapsed = time.monotonic() - started
    printed = table(found)
    times = [c.first_handshake_s for c in found if c.first_handshake_s is not None]
    summary = ""
    if times:
        p95 = statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]
        summary = f"order to first handshake p50 {statistics.median(times):.1f} s, p95 {p95:.1f} s"
    print(f"\n{printed}\n({len(found)} cells in {elapsed:.0f} s; {summary})")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "product-matrix.json").write_text(
        json.dumps(
            {"seconds": elapsed, "full": FULL, "cells": [asdict(c) for c in found]}, indent=2
        )
    )
    errors = [f"{c.provider} x {c.buyer}: {c.error}" for c in found if c.error]
    assert not errors, "\n".join(errors) + "\n" + printed
    # Every cell passes traffic.
    dead = [f"{c.provider} x {c.buyer}" for c in found if not (c.pinged and c.moved == PAYLOAD)]
    assert not dead, f"no traffic across: {dead}\n{printed}"
    for c in found:
        # Direct exactly where the provider declared an endpoint (public), else on the relay,
        # and the buyer's WireGuard sends where the path says.
        if c.provider == "public":
            assert (c.path, c.relay) == ("direct", None), printed
            assert c.buyer_endpoint.startswith(nat_lab.PROVIDER_NET + "."), c
        else:
            assert (c.path, c.relay) == ("relayed", RELAY_NAME), printed
            # Where the node can reach the buyer's mapping (the cells that may upgrade, and the
            # hairpin cell, whose one NAT hairpins), the node may already send direct while the
            # gateway still says relayed, and WireGuard roams the buyer to where authenticated
            # packets come from: the provider's public mapping (CI saw it in the hairpin cell
            # on 7 December). Anywhere else the buyer sends to the relay.
            may_roam = c.expects_upgrade or c.provider == "hairpin"
            assert c.buyer_endpoint.startswith(relayed.RELAY_ADDRESS + ":") or (
                may_roam and c.buyer_endpoint.startswith(nat_lab.PROVIDER_NET + ".")
            ), c
    # The upgrade: direct in the end where the buyer's NAT lets the node in, the buyer's client
    # roamed to the provider's public address, and the tunnel still carries pings.
    if not UPGRADE:
        return
    stuck = [
        f"{c.provider} x {c.buyer}: upgraded after {c.upgraded_s}, buyer sends to "
        f"{c.upgraded_endpoint}, ping {c.upgraded_pinged}"
        for c in found
        if c.expects_upgrade
        and not (
            c.upgraded_s is not None
            and c.upgraded_endpoint.startswith(nat_lab.PROVIDER_NET + ".")
            and c.upgraded_pinged
        )
    ]
    assert not stuck, f"not direct within {UPGRADE_BOUND_S} s:\n" + "\n".join(stuck)


def _pair_id(order_id: int) -> str:
    """The relay's id of an order's pair (meshnet.relays: the job peer's)."""
    return f"peer-{JobPeer.objects.get(ref=f'order:{order_id}').pk}"


def test_a_provider_whose_router_reboots_keeps_its_buyer(lab, settings, tmp_path):
    """The issue's "a provider's address changes (a home router reboots): its buyers keep
    working within 30 s without downloading anything", with the product: a relayed order on a
    `clawnode` behind a port-restricted NAT, the buyer's wg-quick behind another. The
    provider's router takes a new public address and forgets every mapping; the buyer pings
    until the tunnel carries them again, with the file it downloaded. The relay must have
    followed the node to the new address and the hub stored the node's new mapping (the
    order's path is still the relay). The time is printed (and kept in the artifacts)."""
    kept: list[Pending] = []
    try:
        with product(lab, settings, tmp_path) as (users, gateway, lab_relay):
            cell = run_cell(lab, gateway, users, "port-restricted", "port-restricted", tmp_path,
                            kept, keep=True)  # fmt: skip
            assert not cell.error and cell.pinged and cell.path == "relayed", cell
            (item,) = kept
            node = Node.objects.get(wireguard_public_key=item.node_key)
            router = next(ns for ns in item.namespaces if ns.startswith("nr0"))
            before = lab_relay.pair_status(_pair_id(item.order_id))
            new_address = f"{nat_lab.PROVIDER_NET}.250"
            rebooted = time.monotonic()
            lab.reboot(router, new_address)

            def pings_again() -> bool:
                return lab.exec(
                    item.buyer.ns, "ping", "-c", "1", "-W", "1", item.target, check=False
                ).returncode == 0  # fmt: skip

            back, _ = wait_for(pings_again, 30)
            took = time.monotonic() - rebooted
            assert back, (
                f"no ping 30 s after the provider's router rebooted: relay "
                f"{lab_relay.pair_status(_pair_id(item.order_id))}"
            )
            # The relay's status file is its snapshot of its last poll (every second): the pings
            # can come back before the next one (seen once).
            wait_for(
                lambda: (
                    (lab_relay.pair_status(_pair_id(item.order_id)) or {})
                    .get("provider", "")
                    .startswith(new_address + ":")
                ),
                5,
            )
            after = lab_relay.pair_status(_pair_id(item.order_id))
            assert before is not None and after is not None
            assert after["provider"].startswith(new_address + ":"), (before, after)
            stored, _ = wait_for(
                lambda: (Node.objects.get(pk=node.pk).observed_endpoint or "").startswith(
                    new_address + ":"
                ),
                30,
            )
            assert stored, Node.objects.get(pk=node.pk).observed_endpoint
            status, body = item.buyer.api("GET", f"/api/v1/orders/{item.order_id}/")
            assert status == 200 and body["path"]["kind"] == "relayed", body
            host = next(ns for ns in item.namespaces if ns.startswith("np"))
            moved = relayed.move_bytes(lab, item.buyer.ns, host, item.target, PAYLOAD)
            assert moved["received"] == PAYLOAD, moved
            print(f"\nprovider's router rebooted onto {new_address}: pings again {took:.1f} s "
                  f"after; {moved['received']} bytes moved after")  # fmt: skip
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "provider-reboot.json").write_text(
                json.dumps({"pings_again_s": took, "relay_before": before, "relay_after": after})
            )
    finally:
        for item in kept:
            _close(lab, item.buyer.ns, item.conf, item.namespaces)
