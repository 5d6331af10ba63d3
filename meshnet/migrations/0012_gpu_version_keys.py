"""Sortable driver and CUDA version keys on GPU rows (meshnet.versions), for the market's
minimum-version filters; existing rows get theirs from the text they already hold."""

import re

from django.db import migrations, models

# A copy of meshnet.versions.version_key as of this migration (migrations do not import code
# that may change later).
_VERSION_RE = re.compile(r"^(\d{1,4})(?:\.(\d{1,4}))?(?:\.(\d{1,4}))?$")


def _key(text):
    match = _VERSION_RE.match((text or "").strip())
    if match is None:
        return None
    major, minor, patch = (int(part or 0) for part in match.groups())
    return (major * 10_000 + minor) * 10_000 + patch


def fill_keys(apps, schema_editor):
    Gpu = apps.get_model("meshnet", "Gpu")
    for gpu in Gpu.objects.only("pk", "driver_version", "cuda_version").iterator():
        Gpu.objects.filter(pk=gpu.pk).update(
            driver_version_key=_key(gpu.driver_version), cuda_version_key=_key(gpu.cuda_version)
        )


class Migration(migrations.Migration):
    dependencies = [("meshnet", "0011_node_observed_endpoint")]

    operations = [
        migrations.AddField(
            model_name="gpu",
            name="driver_version_key",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="gpu",
            name="cuda_version_key",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(fill_keys, migrations.RunPython.noop),
    ]
