# The buyer's one WireGuard key of a multi-node order (every part's node gets it). Orders
# placed before had a key per part: theirs is part 0's, and their parts keep their own tunnels.

from django.db import migrations, models


def backfill(apps, schema_editor):
    Cluster = apps.get_model("marketplace", "Cluster")
    Order = apps.get_model("marketplace", "Order")
    for cluster in Cluster.objects.only("pk"):
        key = (
            Order.objects.filter(cluster_id=cluster.pk)
            .order_by("part_index")
            .values_list("wireguard_public_key", flat=True)
            .first()
        )
        Cluster.objects.filter(pk=cluster.pk).update(wireguard_public_key=key or "")


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0010_multi_node_orders"),
    ]

    operations = [
        migrations.AddField(
            model_name="cluster",
            name="wireguard_public_key",
            field=models.CharField(default="", max_length=44),
            preserve_default=False,
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
