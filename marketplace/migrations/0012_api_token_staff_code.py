"""ApiToken.staff_code (a staff token carries staff powers only if issued with the second
factor), and an expiry for the tokens issued before expiry existed (migration 0005 left them
null, so they never expired): 90 days from their issue, the default TTL, so one issued long ago
is expired now and its holder issues a new one."""

from datetime import timedelta

from django.db import migrations, models
from django.db.models import F


def expire_old_tokens(apps, schema_editor):
    ApiToken = apps.get_model("marketplace", "ApiToken")
    ApiToken.objects.filter(expires_at__isnull=True).update(
        expires_at=F("created_at") + timedelta(days=90)
    )


class Migration(migrations.Migration):
    dependencies = [("marketplace", "0011_cluster_buyer_key")]

    operations = [
        migrations.AddField(
            model_name="apitoken",
            name="staff_code",
            field=models.BooleanField(default=False),
        ),
        migrations.RunPython(expire_old_tokens, migrations.RunPython.noop),
    ]
