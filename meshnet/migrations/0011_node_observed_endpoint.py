# The hub's view of each node's public WireGuard mapping (meshnet.hub, docs/nat.md).

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("meshnet", "0010_sandboxes"),
    ]

    operations = [
        migrations.AddField(
            model_name="node",
            name="observed_endpoint",
            field=models.CharField(blank=True, max_length=300),
        ),
        migrations.AddField(
            model_name="node",
            name="observed_endpoint_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
