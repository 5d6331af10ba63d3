"""`manage.py seed_demo`: a small demo market for `make run`.

Two providers whose nodes enrol through the real signed enrolment path (a fresh Ed25519
identity signs an EnrollRequest with a one-time token, exactly as `clawnode join` does, with
GPUs marked simulated), listings across GPU models and regions, a buyer with credits, and an
operator superuser with a TOTP device for the admin, all as marketplace/demo_data.py describes
them. The passwords and the operator's TOTP key are fixed and printed: this is a demo database,
so the command refuses to run with DEBUG off unless --force.

Idempotent: users are found by username, nodes by (owner, hostname), listings by (node, model,
count, prices), and the buyer's credits by the grant's memo, so a second run creates nothing
and prints the same credentials.

--agents-dir DIR --gateway URL (what `make run` passes): each demo node's agent state is kept in
DIR/<hostname>/ (its identity, 0600, and an enrollment.json for URL), so that
scripts/demo_agents.py can run the nodes' agents. A node whose identity is not there (seeded
without --agents-dir, or the directory was removed) cannot be spoken for: it is revoked and the
machine enrolled again, with its listings, under a fresh identity.
"""

from __future__ import annotations

import base64
from pathlib import Path

from clawnode.keys import Identity
from clawnode.state import StateDir
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django_otp.plugins.otp_totp.models import TOTPDevice

from marketplace import ledger
from marketplace.demo_data import (
    BUYER,
    OPERATOR,
    OPERATOR_TOTP_KEY,
    PROVIDERS,
    DemoUser,
    enrol_demo_node,
    save_demo_agent,
)
from marketplace.demo_data import real_nodes as demo_real_nodes
from marketplace.errors import MarketError
from marketplace.listings import create_listing
from marketplace.models import LedgerTransaction, Listing
from marketplace.money import MICRO_PER_USD
from meshnet.errors import MeshError
from meshnet.models import Node
from meshnet.nodes import revoke_node

DEMO_CREDITS = 500 * MICRO_PER_USD
CREDITS_MEMO = "seed_demo: demo credits"


class Command(BaseCommand):
    help = "Load a demo market (providers, simulated nodes, listings, a buyer with credits)."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--force",
            action="store_true",
            help="run even with DEBUG off (the demo accounts have published passwords)",
        )
        parser.add_argument(
            "--agents-dir",
            type=Path,
            default=None,
            help="keep each demo node's agent state (identity, enrolment) in DIR/<hostname>/",
        )
        parser.add_argument(
            "--gateway",
            default="",
            help="the gateway URL the demo agents connect to (with --agents-dir)",
        )
        parser.add_argument(
            "--real-nodes",
            action="store_true",
            help="the demo nodes run real clawnode daemons in network namespaces "
            "(scripts/demo_nodes.py): each declares its namespace's address as its endpoint "
            "and gets a WireGuard interface name of its own (with --agents-dir)",
        )

    def handle(
        self,
        *args,
        force: bool,
        agents_dir: Path | None = None,
        gateway: str = "",
        real_nodes: bool = False,
        **options,
    ) -> None:
        if agents_dir is not None and not gateway:
            raise CommandError("--agents-dir needs --gateway URL (where the agents connect)")
        if real_nodes and agents_dir is None:
            raise CommandError("--real-nodes needs --agents-dir DIR (where the daemons' state is)")
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
                created, identities = self._seed(agents_dir, real_nodes)
        except (MeshError, MarketError) as exc:
            raise CommandError(f"seeding failed, nothing was written: {exc}") from None
        if agents_dir is not None:
            # After the commit: an agent never holds an identity for a node that was not made.
            plan = {real.hostname: real for real in demo_real_nodes()}
            for hostname, (node, identity) in identities.items():
                real = plan[hostname] if real_nodes else None
                save_demo_agent(StateDir(agents_dir / hostname), node, identity, gateway, real)
        nodes = Node.objects.filter(
            owner__username__in=[p.username for p, _ in PROVIDERS], revoked_at__isnull=True
        )
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

    def _seed(
        self, agents_dir: Path | None, real_nodes: bool = False
    ) -> tuple[dict[str, int], dict[str, tuple]]:
        created = {"users": 0, "nodes": 0, "listings": 0, "grants": 0}
        identities: dict[str, tuple[Node, Identity]] = {}
        operator = self._user(OPERATOR, created, superuser=True)
        # Staff need a TOTP code for the admin (frontend/staff_otp.py): the demo's is published.
        if not TOTPDevice.objects.filter(user=operator).exists():
            TOTPDevice.objects.create(
                user=operator, name="demo authenticator", key=OPERATOR_TOTP_KEY, confirmed=True
            )
        buyer = self._user(BUYER, created)
        already_granted = LedgerTransaction.objects.filter(
            kind=LedgerTransaction.Kind.GRANT, memo=CREDITS_MEMO, entries__account__user=buyer
        ).exists()
        if not already_granted:
            ledger.grant_credits(buyer, DEMO_CREDITS, memo=CREDITS_MEMO)
            created["grants"] += 1
        plan = {real.hostname: real for real in demo_real_nodes()}
        for demo_provider, demo_nodes in PROVIDERS:
            provider = self._user(demo_provider, created)
            for demo_node in demo_nodes:
                node = Node.objects.filter(
                    owner=provider, hostname=demo_node.hostname, revoked_at__isnull=True
                ).first()
                identity = None
                if node is not None and agents_dir is not None:
                    identity = _kept_identity(agents_dir / demo_node.hostname, node)
                    if identity is None:
                        # No agent can speak for a node whose key is gone: enrol it afresh.
                        revoke_node(node, "seed_demo: the demo agent's identity is not kept")
                        node = None
                if node is None:
                    node, identity = enrol_demo_node(provider, demo_node)
                    created["nodes"] += 1
                if agents_dir is not None:
                    identities[demo_node.hostname] = (node, identity)
                # A real demo node is reached at its namespace's address (what a buyer's config
                # names as the Endpoint); a simulated one keeps the documentation address.
                endpoint = plan[demo_node.hostname].endpoint if real_nodes else demo_node.endpoint
                if node.declared_endpoint != endpoint:
                    Node.objects.filter(pk=node.pk).update(declared_endpoint=endpoint)
                for demo_listing in demo_node.listings:
                    terms = demo_node.listing_terms(demo_listing)
                    if not Listing.objects.visible().filter(node=node, **terms).exists():
                        create_listing(provider, node=node, **terms)
                        created["listings"] += 1
        return created, identities

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
        operator = users.objects.get(username=OPERATOR.username)
        if TOTPDevice.objects.filter(user=operator, key=OPERATOR_TOTP_KEY).exists():
            key = base64.b32encode(bytes.fromhex(OPERATOR_TOTP_KEY)).decode()
            self.stdout.write(
                f"  {OPERATOR.username}'s admin code: any TOTP app with the key {key}, or "
                f"`oathtool --totp -b {key}`"
            )


def _kept_identity(path: Path, node: Node) -> Identity | None:
    """The identity kept in `path` if it is `node`'s, else None."""
    try:
        identity = StateDir(path).load_identity()
    except (OSError, ValueError):
        return None
    return identity if identity is not None and identity.node_id == node.node_id else None
