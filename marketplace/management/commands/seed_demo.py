"""`manage.py seed_demo`: a small demo market for `make run`.

Two providers whose nodes enrol through the real signed enrolment path (a fresh Ed25519
identity signs an EnrollRequest with a one-time token, exactly as `clawnode join` does, with
GPUs marked simulated), listings across GPU models and regions, a buyer with credits, and an
operator superuser. The passwords are fixed and printed: this is a demo database, so the command
refuses to run with DEBUG off unless --force.

Idempotent: users are found by username, nodes by (owner, hostname), listings by (node, model,
count, prices), and the buyer's credits by the grant's memo, so a second run creates nothing
and prints the same credentials.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from clawnode import wire
from clawnode.keys import Identity
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from marketplace import ledger
from marketplace.errors import MarketError
from marketplace.listings import create_listing
from marketplace.models import LedgerTransaction, Listing
from marketplace.money import MICRO_PER_USD
from meshnet.enrolment import create_enrollment_token, enroll_node
from meshnet.errors import MeshError
from meshnet.models import Node

DEMO_CREDITS = 500 * MICRO_PER_USD
CREDITS_MEMO = "seed_demo: demo credits"

H100 = ("NVIDIA H100 80GB HBM3", 81559)
A100 = ("NVIDIA A100 80GB PCIe", 81920)
L40S = ("NVIDIA L40S", 49152)
RTX_4090 = ("NVIDIA GeForce RTX 4090", 24564)
RTX_3090 = ("NVIDIA GeForce RTX 3090", 24576)


@dataclass(frozen=True)
class DemoListing:
    gpu_count: int
    price_per_gpu_hour: int  # micro-USD
    price_per_gib: int  # micro-USD


@dataclass(frozen=True)
class DemoNode:
    hostname: str
    region: str
    gpu: tuple[str, int]  # (NVML name, memory in MiB)
    gpu_count: int
    observed_ip: str  # documentation ranges only: nothing here is a real machine
    endpoint: str
    listings: tuple[DemoListing, ...]


@dataclass(frozen=True)
class DemoUser:
    username: str
    password: str
    role: str


OPERATOR = DemoUser("operator", "operator-demo-pass", "superuser: /admin/")
BUYER = DemoUser("demo-buyer", "buyer-demo-pass", "buyer with 500 USD of credits")
PROVIDERS: tuple[tuple[DemoUser, tuple[DemoNode, ...]], ...] = (
    (
        DemoUser("dc-provider", "dc-provider-demo-pass", "provider: data-centre nodes"),
        (
            DemoNode(
                "dc-sjc-01",
                "us-west",
                H100,
                8,
                "198.51.100.21",
                "198.51.100.21:51820",
                (DemoListing(8, 2_490_000, 10_000),),
            ),
            DemoNode(
                "dc-iad-01",
                "us-east",
                A100,
                4,
                "198.51.100.22",
                "198.51.100.22:51820",
                (DemoListing(4, 1_590_000, 8_000),),
            ),
            DemoNode(
                "dc-iad-02",
                "us-east",
                L40S,
                4,
                "198.51.100.23",
                "198.51.100.23:51820",
                (DemoListing(2, 890_000, 8_000), DemoListing(2, 990_000, 6_000)),
            ),
            DemoNode(
                "dc-ams-01",
                "eu-west",
                A100,
                8,
                "198.51.100.24",
                "198.51.100.24:51820",
                (DemoListing(4, 1_490_000, 9_000),),
            ),
            DemoNode(
                "dc-sin-01",
                "asia",
                H100,
                4,
                "198.51.100.25",
                "198.51.100.25:51820",
                (DemoListing(4, 2_790_000, 12_000),),
            ),
        ),
    ),
    (
        DemoUser("home-provider", "home-provider-demo-pass", "provider: home machines behind NAT"),
        (
            DemoNode(
                "home-berlin",
                "eu-west",
                RTX_4090,
                2,
                "203.0.113.41",
                "",
                (DemoListing(2, 350_000, 5_000),),
            ),
            DemoNode(
                "home-lyon",
                "eu-west",
                RTX_3090,
                2,
                "203.0.113.42",
                "",
                (DemoListing(2, 190_000, 4_000),),
            ),
            DemoNode(
                "home-austin",
                "us-west",
                RTX_3090,
                1,
                "203.0.113.43",
                "",
                (DemoListing(1, 220_000, 4_000),),
            ),
            DemoNode(
                "home-osaka",
                "asia",
                RTX_4090,
                1,
                "203.0.113.44",
                "",
                (DemoListing(1, 390_000, 6_000),),
            ),
        ),
    ),
)


def _simulated_gpus(node: DemoNode) -> tuple[wire.GpuInfo, ...]:
    name, memory_mb = node.gpu
    return tuple(
        wire.GpuInfo(
            index=index,
            name=name,
            memory_mb=memory_mb,
            # Stable per host and slot, shaped like NVML's "GPU-<uuid>".
            uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{node.hostname}.demo.molt/{index}')}",
            driver_version="550.54.15",
            cuda_version="12.4",
            simulated=True,
        )
        for index in range(node.gpu_count)
    )


def _enrol(owner, node: DemoNode) -> Node:
    """Enrol `node` for `owner` the way `clawnode join` does: a new identity signs an enrolment
    request carrying a one-time token. The identity's private key is not kept: demo nodes are
    listings to look at, not machines an agent will ever connect from."""
    identity = Identity.generate()
    issued = create_enrollment_token(owner)
    body = wire.EnrollRequest(
        token=issued.token,
        identity_public_key=identity.public_key_b64,
        wireguard_public_key=identity.wireguard_public_key_b64,
        hostname=node.hostname,
        listen_port=51820,
        endpoint=node.endpoint,
        gpus=_simulated_gpus(node),
        timestamp=int(time.time()),
        nonce=wire.new_nonce(),
    ).to_dict()
    envelope = wire.signed_envelope(wire.ENROLL, body, identity)
    enrolled = enroll_node(envelope, observed_ip=node.observed_ip).node
    # Region is operator metadata the enrolment request does not carry (no service sets it yet).
    Node.objects.filter(pk=enrolled.pk).update(region=node.region)
    enrolled.region = node.region
    return enrolled


class Command(BaseCommand):
    help = "Load a demo market (providers, simulated nodes, listings, a buyer with credits)."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--force",
            action="store_true",
            help="run even with DEBUG off (the demo accounts have published passwords)",
        )

    def handle(self, *args, force: bool, **options) -> None:
        if not settings.DEBUG and not force:
            raise CommandError(
                "refusing to seed: DEBUG is off, and the demo accounts have published passwords. "
                "Run with DJANGO_DEBUG=true, or pass --force if this really is a demo database."
            )
        if not settings.MOLT_ALLOW_SIMULATED_GPUS:
            raise CommandError(
                "the demo nodes have simulated GPUs, which this gateway refuses: "
                "set MOLT_ALLOW_SIMULATED_GPUS=true"
            )
        try:
            with transaction.atomic():
                created = self._seed()
        except (MeshError, MarketError) as exc:
            raise CommandError(f"seeding failed, nothing was written: {exc}") from None
        nodes = Node.objects.filter(owner__username__in=[p.username for p, _ in PROVIDERS])
        listings = Listing.objects.available().filter(node__in=nodes)
        self.stdout.write(
            f"demo market: {len(PROVIDERS)} providers, {nodes.count()} nodes, "
            f"{listings.count()} listings "
            f"(this run created {created['users']} users, {created['nodes']} nodes, "
            f"{created['listings']} listings, {created['grants']} credit grants)"
        )
        self._print_credentials()

    def _user(self, demo: DemoUser, created: dict[str, int], *, superuser: bool = False):
        users = get_user_model()
        user = users.objects.filter(username=demo.username).first()
        if user is None:
            email = f"{demo.username}@example.com"
            make = users.objects.create_superuser if superuser else users.objects.create_user
            user = make(username=demo.username, email=email, password=demo.password)
            created["users"] += 1
        return user

    def _seed(self) -> dict[str, int]:
        created = {"users": 0, "nodes": 0, "listings": 0, "grants": 0}
        self._user(OPERATOR, created, superuser=True)
        buyer = self._user(BUYER, created)
        already_granted = LedgerTransaction.objects.filter(
            kind=LedgerTransaction.Kind.GRANT, memo=CREDITS_MEMO, entries__account__user=buyer
        ).exists()
        if not already_granted:
            ledger.grant_credits(buyer, DEMO_CREDITS, memo=CREDITS_MEMO)
            created["grants"] += 1
        for demo_provider, demo_nodes in PROVIDERS:
            provider = self._user(demo_provider, created)
            for demo_node in demo_nodes:
                node = Node.objects.filter(
                    owner=provider, hostname=demo_node.hostname, revoked_at__isnull=True
                ).first()
                if node is None:
                    node = _enrol(provider, demo_node)
                    created["nodes"] += 1
                for demo_listing in demo_node.listings:
                    exists = (
                        Listing.objects.visible()
                        .filter(
                            node=node,
                            gpu_model=demo_node.gpu[0],
                            gpu_count=demo_listing.gpu_count,
                            price_per_gpu_hour=demo_listing.price_per_gpu_hour,
                            price_per_gib=demo_listing.price_per_gib,
                        )
                        .exists()
                    )
                    if not exists:
                        create_listing(
                            provider,
                            node=node,
                            gpu_model=demo_node.gpu[0],
                            gpu_count=demo_listing.gpu_count,
                            price_per_gpu_hour=demo_listing.price_per_gpu_hour,
                            price_per_gib=demo_listing.price_per_gib,
                        )
                        created["listings"] += 1
        return created

    def _print_credentials(self) -> None:
        users = get_user_model()
        self.stdout.write("demo accounts (published passwords: a demo database only):")
        demo_users = [OPERATOR, BUYER, *(provider for provider, _ in PROVIDERS)]
        width = max(len(demo.username) for demo in demo_users)
        for demo in demo_users:
            user = users.objects.get(username=demo.username)
            shown = demo.password
            # The hashers' function, not User.check_password: that one may re-hash and save.
            if not check_password(demo.password, user.password):
                shown = "(changed since seeding)"
            self.stdout.write(f"  {demo.username.ljust(width)}  {shown.ljust(24)}  {demo.role}")
