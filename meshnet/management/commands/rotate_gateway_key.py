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
(by the last certificate's not_before, or the key file's age before any rotation). Beat does
this daily by itself (meshnet.tasks.rotate_gateway_key_if_due, MOLT_GATEWAY_KEY_MAX_AGE_DAYS).
"""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from meshnet.gateway_key import current_key_since
from meshnet.tasks import SECONDS_PER_DAY, rotate_gateway_key


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
        try:
            done = rotate_gateway_key(if_signed_for_days=if_older_than, push=not no_push)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        if done is None:
            age_days = (time.time() - current_key_since()) / SECONDS_PER_DAY
            self.stdout.write(
                f"gateway key is {age_days:.1f} days old (< {if_older_than}): not rotated"
            )
            return
        rotation, sent = done
        self.stdout.write(
            f"gateway key rotated: {rotation.old_key} -> {rotation.new_key} "
            f"(certificate {rotation.sequence}); the old key is kept in gateway-keys/"
        )
        if sent is not None:
            self.stdout.write(f"pushed the state signed by the new key to {sent} nodes")
