"""`manage.py rotate_gateway_key`: replace the gateway's signing key without any node re-joining
(meshnet.gateway_key.rotate_gateway_key; the rules agents follow: clawnode.wire.keycert).

The new key is certified by the current one and signs from then on; the certificate chain goes
to agents beside every desired state, and each agent pins the new key on the first state it
verifies through the chain. The command then gives every live node a new desired revision
(its state changed: the new key signs it, and the hub peer in it has the new key) and pushes
every live node's current state at once (at most once over the channel layer, like any push); a
push lost is sent again by the repush-lagging-nodes sweep, and an agent away gets the chain on
its next connect, however long it has been away.

`--if-older-than DAYS` rotates only when the current key has signed for at least that long
(by the last certificate's not_before, or the key file's age before any rotation), so a daily
cron or beat entry gives automatic rotation.
"""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import F

from meshnet.gateway_key import gateway_identity, gateway_key_path, key_certificates
from meshnet.gateway_key import rotate_gateway_key as rotate
from meshnet.models import Node
from meshnet.tasks import push_desired_states


class Command(BaseCommand):
    help = "Rotate the gateway's signing key; agents follow without re-joining."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--if-older-than",
            type=float,
            metavar="DAYS",
            help="rotate only if the current key has signed for at least DAYS days",
        )
        parser.add_argument(
            "--no-push", action="store_true", help="do not push every node's state now"
        )

    def handle(self, *args, if_older_than: float | None, no_push: bool, **options) -> None:
        if if_older_than is not None:
            age_days = (time.time() - _current_since()) / 86400
            if age_days < if_older_than:
                self.stdout.write(
                    f"gateway key is {age_days:.1f} days old (< {if_older_than}): not rotated"
                )
                return
        try:
            rotation = rotate()
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"gateway key rotated: {rotation.old_key} -> {rotation.new_key} "
            f"(certificate {rotation.sequence}); the old key is kept in gateway-keys/"
        )
        pks = _bump_live_nodes()
        if not no_push:
            sent = push_desired_states(pks)
            self.stdout.write(f"pushed the state signed by the new key to {sent} nodes")


def _bump_live_nodes() -> list[int]:
    """A new desired revision for every live node: its state changed (signed by the new key, and
    its hub peer has the new key's X25519 conversion, meshnet.hub.hub_peer), so a push the
    channel layer drops, or --no-push, is made good by the repush-lagging-nodes sweep rather
    than waiting for the node's next change or reconnect. One transaction; rows locked in
    primary-key order, as everywhere in meshnet."""
    with transaction.atomic():
        pks = list(
            Node.objects.select_for_update()
            .filter(revoked_at__isnull=True)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        Node.objects.filter(pk__in=pks).update(desired_revision=F("desired_revision") + 1)
    return pks


def _current_since() -> float:
    chain = key_certificates()
    if chain:
        return float(chain[-1]["body"]["not_before"])
    gateway_identity()  # created now if it never was: age 0
    return gateway_key_path().stat().st_mtime
