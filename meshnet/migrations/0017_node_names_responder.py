# Whether a node's agent runs the names responder (meshnet.names, docs/names.md).

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("meshnet", "0016_relay"),
    ]

    operations = [
        migrations.AddField(
            model_name="node",
            name="names_responder",
            field=models.BooleanField(default=False),
        ),
    ]
