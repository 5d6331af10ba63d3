# One buyer key (and one tunnel address) for every part of a multi-node order: a key may be
# live on several job peers when they are of one group (PeerKeyClaim), and metering's
# one-open-key rule holds per node (JobPeerKey.node). Existing peers become groups of one.

import django.db.models.deletion
import django.db.models.functions.text
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("meshnet", "0019_sandbox_mesh_group"),
    ]

    operations = [
        migrations.CreateModel(
            name="PeerKeyClaim",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("public_key", models.CharField(max_length=44, unique=True)),
                ("group", models.CharField(max_length=64)),
                ("token", models.CharField(max_length=109, unique=True)),
                (
                    "allocation",
                    models.OneToOneField(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="key_claim",
                        to="meshnet.ipallocation",
                    ),
                ),
            ],
        ),
        migrations.RemoveConstraint(model_name="jobpeer", name="peer_key_live_once"),
        migrations.RemoveConstraint(model_name="jobpeer", name="peer_address_live_once"),
        migrations.RemoveConstraint(model_name="jobpeerkey", name="peer_key_open_once"),
        migrations.AddField(
            model_name="jobpeer",
            name="key_group",
            field=models.CharField(default="", max_length=64),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="jobpeer",
            name="key_claim",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="peers",
                to="meshnet.peerkeyclaim",
                to_field="token",
            ),
        ),
        migrations.AddField(
            model_name="jobpeerkey",
            name="node",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="peer_keys",
                to="meshnet.node",
            ),
        ),
    ]
