"""The operator commands: grant_credits (units, errors) and seed_demo (the demo market of
`make run`: built through the real enrolment and listing services, idempotent, balanced)."""

from __future__ import annotations

import base64
import ipaddress
import json
from io import StringIO

import pytest
from clawnode.keys import encode_key, x25519_public_from_ed25519
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Sum
from django.test import override_settings

from marketplace.audit import audit_ledger
from marketplace.ledger import available_for
from marketplace.models import Account, LedgerEntry, LedgerTransaction, Listing
from meshnet import ipplan
from meshnet.models import EnrollmentToken, Gpu, IpAllocation, Node
from tests.factories import USD

pytestmark = [pytest.mark.db, pytest.mark.django_db]

MOLT_RANGE = ipaddress.IPv4Network("10.100.128.0/17")


def grant(*args: str) -> str:
    out = StringIO()
    call_command("grant_credits", *args, stdout=out)
    return out.getvalue()


def seed(**options) -> str:
    out = StringIO()
    call_command("seed_demo", stdout=out, **options)
    return out.getvalue()


# A fast hasher: seed_demo hashes and checks four passwords per run, and PBKDF2 is slow on purpose.
FAST_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def demo_settings():
    # pytest-django runs tests with DEBUG off; seed_demo is for development databases.
    with override_settings(
        DEBUG=True, MOLT_ALLOW_SIMULATED_GPUS=True, PASSWORD_HASHERS=FAST_HASHERS
    ):
        yield


def table_counts() -> dict[str, int]:
    models = [
        get_user_model(), Node, Gpu, IpAllocation, EnrollmentToken, Listing, Account,
        LedgerTransaction, LedgerEntry,
    ]  # fmt: skip
    return {model.__name__: model.objects.count() for model in models}


def assert_ledger_balances() -> None:
    assert LedgerEntry.objects.aggregate(total=Sum("amount"))["total"] in (0, None)
    for txn in LedgerTransaction.objects.all():
        assert sum(txn.entries.values_list("amount", flat=True)) == 0, txn
    for account in Account.objects.all():
        entries = account.entries.aggregate(total=Sum("amount"))["total"] or 0
        assert account.balance == entries, account
        if account.kind != Account.Kind.WORLD:
            assert account.balance >= 0, account


# --- grant_credits ---------------------------------------------------------------------------


def test_grant_credits_takes_an_integer_as_micro_usd(buyer):
    out = grant("alice", "2500000")

    assert available_for(buyer) == 2_500_000
    assert "granted 2.50 USD to alice" in out
    assert_ledger_balances()


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("25usd", 25 * USD),
        ("25USD", 25 * USD),
        ("25.50 usd", 25_500_000),
        ("$25.50", 25_500_000),
        ("$ 7", 7 * USD),
        ("$0.000001", 1),
        ("0.1usd", 100_000),  # exact in Decimal (0.1 is not exact as a float)
        ("1_000_000", 1_000_000),
    ],
)
def test_grant_credits_converts_dollars_exactly(buyer, text, micro):
    grant("alice", text)

    assert available_for(buyer) == micro


def test_grant_credits_prints_the_new_balance_in_dollars_exactly(buyer):
    grant("alice", "$100")
    out = grant("alice", "250001")

    # Every digit of an amount finer than a cent, and never the ledger's unit.
    assert "granted 0.250001 USD to alice" in out
    assert "available balance 100.250001 USD" in out
    assert "micro" not in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "positive"),
        ("-5", "positive"),
        ("$-1", "positive"),
        ("0usd", "positive"),
        ("1.5", "must be an integer"),
        ("$0.0000001", "finer than one micro-USD"),
        ("abc", "not an amount"),
        ("25eur", "not an amount"),
        ("1,5usd", "not an amount"),
        ("1e6", "not an amount"),
        ("", "not an amount"),
        ("99999999999999usd", "more than the ledger can hold"),
    ],
)
def test_grant_credits_refuses_a_bad_amount_and_moves_nothing(buyer, text, message):
    with pytest.raises(CommandError, match=message):
        grant("alice", text)

    assert available_for(buyer) == 0
    assert not LedgerTransaction.objects.exists()


def test_grant_credits_refuses_an_unknown_user(db):
    with pytest.raises(CommandError, match="no user named 'nobody'"):
        grant("nobody", "25usd")

    assert not LedgerTransaction.objects.exists()


# --- seed_demo ----------------------------------------------------------------------------------


def test_seed_demo_builds_a_market_across_models_and_regions(demo_settings):
    seed()

    users = get_user_model().objects
    assert users.get(username="operator").is_superuser
    buyer = users.get(username="demo-buyer")
    assert available_for(buyer) == 500 * USD
    providers = users.filter(username__in=["dc-provider", "home-provider"])
    assert providers.count() == 2

    nodes = Node.objects.filter(owner__in=providers)
    assert nodes.count() >= 6
    assert {n.region for n in nodes} == {"us-west", "us-east", "eu-west", "asia"}
    assert all(gpu.simulated for gpu in Gpu.objects.filter(node__in=nodes))

    listings = Listing.objects.available()
    assert listings.count() >= 8
    models = {listing.gpu_model for listing in listings}
    for wanted in ("RTX 4090", "RTX 3090", "A100 80GB", "H100 80GB", "L40S"):
        assert any(wanted in model for model in models), wanted
    assert len({listing.price_per_gpu_hour for listing in listings}) >= 6
    assert all(listing.simulated and listing.region for listing in listings)
    rtx_4090 = (
        listings.filter(gpu_model__contains="RTX 4090").order_by("price_per_gpu_hour").first()
    )
    assert rtx_4090.vram_gb == 24
    assert rtx_4090.price_per_gpu_hour == 350_000


def test_seed_demo_enrols_nodes_through_the_signed_enrolment_path(demo_settings):
    seed()

    for node in Node.objects.all():
        # The token was consumed by this node, as the enrolment service records it.
        token = EnrollmentToken.objects.get(node=node)
        assert token.used_at is not None and token.owner_id == node.owner_id
        # The WireGuard key is the X25519 conversion of the identity key: the enrolment
        # service checked that against a request signed by the identity.
        identity = base64.b64decode(node.identity_public_key)
        assert encode_key(x25519_public_from_ed25519(identity)) == node.wireguard_public_key
        assert node.name == f"node-{node.pk}"
        assert node.endpoint  # declared (data centre) or observed address plus listen port


def test_seed_demo_gives_nodes_unique_addresses_in_their_regions_blocks(demo_settings):
    seed()

    nodes = list(Node.objects.values_list("mesh_address", "region"))
    addresses = [ipaddress.IPv4Address(address) for address, _ in nodes]
    assert addresses
    assert len(set(addresses)) == len(addresses)
    for (address, region), ip in zip(nodes, addresses, strict=True):
        # The demo's nodes declare their region at enrolment, as `clawnode join --region` does.
        block = ipplan.block(region).network if region else MOLT_RANGE
        assert ip in block, (address, region)
        assert ip not in (block.network_address, block.broadcast_address)


def test_seed_demo_twice_changes_nothing_and_prints_the_same_credentials(demo_settings):
    first = seed()
    counts = table_counts()
    balance = available_for(get_user_model().objects.get(username="demo-buyer"))

    second = seed()

    assert table_counts() == counts
    assert available_for(get_user_model().objects.get(username="demo-buyer")) == balance
    assert "created 0 users, 0 nodes, 0 listings, 0 credit grants" in second
    credentials = [line for line in first.splitlines() if "demo-pass" in line]
    assert len(credentials) == 4
    assert credentials == [line for line in second.splitlines() if "demo-pass" in line]


def test_seed_demo_leaves_the_ledger_balanced(demo_settings):
    seed()
    seed()

    assert_ledger_balances()
    assert audit_ledger() == []
    grants = LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.GRANT)
    assert grants.count() == 1


def test_seed_demo_passwords_log_in(demo_settings, client):
    output = seed()

    assert "operator-demo-pass" in output
    assert client.login(username="demo-buyer", password="buyer-demo-pass")
    assert client.login(username="operator", password="operator-demo-pass")


def test_seed_demo_does_not_reset_a_changed_password(demo_settings):
    seed()
    buyer = get_user_model().objects.get(username="demo-buyer")
    buyer.set_password("a-new-secret-of-the-buyer")
    buyer.save()

    output = seed()

    buyer.refresh_from_db()
    assert buyer.check_password("a-new-secret-of-the-buyer")
    assert "buyer-demo-pass" not in output
    assert "(changed since seeding)" in output


def test_seed_demo_refuses_without_debug_unless_forced():
    with override_settings(
        DEBUG=False, MOLT_ALLOW_SIMULATED_GPUS=True, PASSWORD_HASHERS=FAST_HASHERS
    ):
        with pytest.raises(CommandError, match="DEBUG is off"):
            seed()
        assert not get_user_model().objects.exists()
        assert not Node.objects.exists()

        seed(force=True)
    assert Listing.objects.available().exists()


def test_seed_demo_refuses_when_simulated_gpus_are_not_accepted():
    refusing = override_settings(DEBUG=True, MOLT_ALLOW_SIMULATED_GPUS=False)
    with refusing, pytest.raises(CommandError, match="MOLT_ALLOW_SIMULATED_GPUS"):
        seed()
    assert not get_user_model().objects.exists()


def test_seed_demo_keeps_each_nodes_agent_identity_and_enrolment(demo_settings, tmp_path):
    """--agents-dir (make run's): each node's identity (0600) and enrolment are kept, so its
    agent can connect; a second run keeps them and the nodes; a node whose key is not kept
    (seeded without --agents-dir) is revoked and enrolled afresh, listings and all."""
    from clawnode.state import StateDir

    seed()  # no agents dir: these nodes' keys are gone
    keyless = set(Node.objects.values_list("node_id", flat=True))
    agents = tmp_path / "agents"

    out = seed(agents_dir=agents, gateway="http://127.0.0.1:8123/")

    assert "9 nodes, 10 listings (this run created 0 users, 9 nodes, 10 listings" in out
    assert (
        set(
            Node.objects.filter(node_id__in=keyless, revoked_at__isnull=False).values_list(
                "node_id", flat=True
            )
        )
        == keyless
    )
    live = {n.hostname: n for n in Node.objects.filter(revoked_at__isnull=True)}
    assert sorted(p.name for p in agents.iterdir()) == sorted(live)
    for hostname, node in live.items():
        state = StateDir(agents / hostname)
        assert state.load_identity().node_id == node.node_id
        assert state.identity_path.stat().st_mode & 0o777 == 0o600
        enrollment = state.load_enrollment()
        assert (enrollment.node_id, enrollment.mesh_address) == (node.node_id, node.mesh_address)
        assert enrollment.websocket_url == "ws://127.0.0.1:8123/ws/agent/"
    assert Listing.objects.available().filter(node__in=live.values()).count() == 10

    again = seed(agents_dir=agents, gateway="http://127.0.0.1:9000")

    assert "created 0 users, 0 nodes, 0 listings" in again
    for hostname, node in live.items():
        enrollment = StateDir(agents / hostname).load_enrollment()
        assert (enrollment.node_id, enrollment.gateway) == (node.node_id, "http://127.0.0.1:9000")


def test_seed_demo_refuses_agents_dir_without_a_gateway(demo_settings, tmp_path):
    with pytest.raises(CommandError, match="--gateway"):
        seed(agents_dir=tmp_path)


def test_seed_demo_real_nodes_places_each_node_on_the_demo_bridge_and_back(demo_settings, tmp_path):
    """--real-nodes (make run with real daemons): each node declares its namespace's address
    as its endpoint (what a buyer's config names), has a WireGuard interface of its own (their
    UAPI sockets share one directory) and real-node.json says where scripts/demo_nodes.py puts
    it; the enrolment allows the plain-http bridge address. Without it, all of that goes back."""
    from clawnode.state import StateDir

    agents = tmp_path / "agents"

    seed(agents_dir=agents, gateway="http://198.18.0.1:8123", real_nodes=True)

    live = {n.hostname: n for n in Node.objects.filter(revoked_at__isnull=True)}
    placed = {
        hostname: json.loads((agents / hostname / "real-node.json").read_text())
        for hostname in live
    }
    addresses = sorted(item["address"] for item in placed.values())
    assert addresses == [f"198.18.0.{host}" for host in range(11, 20)]
    assert len({item["interface"] for item in placed.values()}) == 9
    for hostname, node in live.items():
        assert node.endpoint == f"{placed[hostname]['address']}:51820"
        enrollment = StateDir(agents / hostname).load_enrollment()
        assert enrollment.interface == placed[hostname]["interface"]
        assert enrollment.insecure and enrollment.websocket_url == "ws://198.18.0.1:8123/ws/agent/"

    seed(agents_dir=agents, gateway="http://127.0.0.1:8123")

    for hostname, node in live.items():
        node.refresh_from_db()
        assert not node.endpoint.startswith("198.18.0."), node.endpoint
        assert not (agents / hostname / "real-node.json").exists()
        assert StateDir(agents / hostname).load_enrollment().interface == "molt0"


def test_seed_demo_refuses_real_nodes_without_an_agents_dir(demo_settings):
    with pytest.raises(CommandError, match="--real-nodes needs --agents-dir"):
        seed(real_nodes=True)
