# The hub's view of each buyer's public WireGuard mapping, per job peer (meshnet.hub,
# docs/nat.md: coordinated punching).

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("meshnet", "0013_node_last_seen_index"),
    ]

    operations = [
        migrations.AddField(
            model_name="jobpeer",
            name="observed_endpoint",
            field=models.CharField(blank=True, max_length=300),
        ),
        migrations.AddField(
            model_name="jobpeer",
            name="observed_endpoint_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
