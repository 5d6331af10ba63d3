# The constraints of one buyer key per group (see 0020), in a migration of their own: on
# PostgreSQL 0021's backfill leaves deferred foreign-key checks pending on meshnet_jobpeer, and
# an ALTER TABLE in the same transaction is refused ("pending trigger events").
import django.db.models.deletion
import django.db.models.functions.text
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("meshnet", "0021_buyer_key_groups_backfill"),
    ]

    operations = [
        migrations.AlterField(
            model_name="jobpeerkey",
            name="node",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="peer_keys",
                to="meshnet.node",
            ),
        ),
        migrations.AddConstraint(
            model_name="jobpeerkey",
            constraint=models.UniqueConstraint(
                condition=models.Q(("closed_at__isnull", True)),
                fields=("public_key", "node"),
                name="peer_key_open_once_per_node",
            ),
        ),
        migrations.AddConstraint(
            model_name="jobpeer",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("key_claim__isnull", True), ("state", "removed")),
                    models.Q(
                        models.Q(("state", "removed"), _negated=True),
                        (
                            "key_claim_id",
                            django.db.models.functions.text.Concat(
                                models.F("public_key"), models.Value(" "), models.F("key_group")
                            ),
                        ),
                    ),
                    _connector="OR",
                ),
                name="peer_live_holds_key_claim",
            ),
        ),
        migrations.AddConstraint(
            model_name="jobpeer",
            constraint=models.UniqueConstraint(
                condition=models.Q(("state", "removed"), _negated=True),
                fields=("public_key", "node"),
                name="peer_key_live_once_per_node",
            ),
        ),
        migrations.AddConstraint(
            model_name="jobpeer",
            constraint=models.UniqueConstraint(
                condition=models.Q(
                    models.Q(("state", "removed"), _negated=True), ("key_group", models.F("ref"))
                ),
                fields=("address",),
                name="peer_address_live_once",
            ),
        ),
        migrations.AddConstraint(
            model_name="jobpeer",
            constraint=models.UniqueConstraint(
                condition=models.Q(("state", "removed"), _negated=True),
                fields=("address", "node"),
                name="peer_address_live_once_per_node",
            ),
        ),
        migrations.AddConstraint(
            model_name="peerkeyclaim",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    (
                        "token",
                        django.db.models.functions.text.Concat(
                            models.F("public_key"), models.Value(" "), models.F("group")
                        ),
                    )
                ),
                name="key_claim_token_is_key_and_group",
            ),
        ),
    ]
