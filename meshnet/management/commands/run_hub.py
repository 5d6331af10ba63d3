"""`manage.py run_hub`: the gateway's WireGuard hub, a process of its own (meshnet.hub).

Brings up the hub interface (MOLT_HUB_INTERFACE, 10.100.0.1/32, MOLT_HUB_PORT, the gateway's
key converted to X25519) on the agent's WireGuard backends (kernel where the kernel has
WireGuard, else wireguard-go; `--backend`), then loops: every MOLT_HUB_POLL_SECONDS it reads its
peers' endpoints and stores each node's public mapping, every MOLT_HUB_RECONCILE_SECONDS it
brings its peer set to the enrolled, non-revoked nodes and its private key to the gateway key's
(a rotation, `manage.py rotate_gateway_key`, needs no restart: meshnet.hub.follow_gateway_key).
Needs root (or CAP_NET_ADMIN), as the agent does.

Stopping it (SIGTERM, SIGINT) leaves the interface up, as an agent leaves its own: a restarted
hub adopts it with every peer's endpoint intact, so a restart loses no node's mapping.
`run_hub --down` takes the interface down for good.
"""

from __future__ import annotations

import signal
import threading
import time

from clawnode.backends.choose import choose_backend
from clawnode.backends.errors import WireGuardError
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, close_old_connections

from meshnet import hub


class Command(BaseCommand):
    help = "Run the gateway's WireGuard hub: discovers each node's public WireGuard mapping."

    _key = ""  # the hub public key the interface was last given (meshnet.hub.bring_up)

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--backend",
            default="auto",
            choices=("auto", "kernel", "userspace"),
            help="WireGuard backend, as clawnode's: auto picks kernel WireGuard, else wireguard-go",
        )
        parser.add_argument(
            "--down", action="store_true", help="take the hub interface down and exit"
        )

    def handle(self, *args, backend: str, down: bool, **options) -> None:
        if not hub.hub_configured():
            raise CommandError(
                "MOLT_HUB_ENDPOINT is not set: it is the host:port nodes send to (the hub's "
                "public address and MOLT_HUB_PORT); without it nodes get no hub peer"
            )
        try:
            backend_class, why = choose_backend(backend)
        except WireGuardError as exc:
            raise CommandError(str(exc)) from None
        device = backend_class(settings.MOLT_HUB_INTERFACE)
        if down:
            try:
                device.delete_interface()
            except WireGuardError as exc:
                raise CommandError(f"cannot take the hub interface down: {exc}") from None
            self.stdout.write(f"hub interface {settings.MOLT_HUB_INTERFACE} down")
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            self._up(device)
        except WireGuardError as exc:
            raise CommandError(f"cannot bring the hub interface up: {exc}") from None
        self.stdout.write(
            f"hub {settings.MOLT_HUB_INTERFACE} at {hub.HUB_ADDRESS} port {settings.MOLT_HUB_PORT}"
            f" ({why}); key {self._key}; nodes send to {settings.MOLT_HUB_ENDPOINT}",
        )
        self.stdout.flush()
        next_reconcile = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_reconcile:
                    # A rotated gateway key becomes the interface's key here, no restart.
                    self._key = hub.follow_gateway_key(device, self._key)
                    results = hub.reconcile_peers(device)
                    failed = {k: v for k, v in results.items() if v != "ok"}
                    if results:
                        self.stdout.write(
                            f"hub peers: {len(results) - len(failed)} changed"
                            + (
                                f", {len(failed)} refused: {next(iter(failed.values()))}"
                                if failed
                                else ""
                            )
                        )
                    next_reconcile = time.monotonic() + settings.MOLT_HUB_RECONCILE_SECONDS
                hub.discover(device)  # meshnet.hub logs each mapping that changed
                self.stdout.flush()
            except DatabaseError as exc:
                # The database restarting must not stop discovery for good: retry next round.
                self.stderr.write(f"hub: database error, retrying: {exc}")
                close_old_connections()
            except WireGuardError as exc:
                # wireguard-go gone (killed, interface deleted): bring it back, peers with it.
                self.stderr.write(f"hub: {exc}; bringing the interface up again")
                next_reconcile = 0.0
                try:
                    self._up(device)
                except WireGuardError as again:
                    self.stderr.write(f"hub: {again}")
            stop.wait(settings.MOLT_HUB_POLL_SECONDS)
        self.stdout.write("hub stopped (interface left up; run_hub --down removes it)")

    def _up(self, device) -> None:
        self._key = hub.bring_up(device)
