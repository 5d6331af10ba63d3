"""A listing's region is its node's (declared at `clawnode join --region`, where the node's mesh
address is): listings whose region was chosen apart from their node's take the node's. Nothing
to undo: the old regions were the provider's free choice, not derived from anything."""

from django.db import migrations
from django.db.models import OuterRef, Subquery


def listing_region_from_node(apps, schema_editor):
    Listing = apps.get_model("marketplace", "Listing")
    Node = apps.get_model("meshnet", "Node")
    node_region = Node.objects.filter(pk=OuterRef("node_id")).values("region")[:1]
    Listing.objects.update(region=Subquery(node_region))


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0008_listing_offer_indexes"),
        ("meshnet", "0014_jobpeer_observed_endpoint"),
    ]

    operations = [migrations.RunPython(listing_region_from_node, migrations.RunPython.noop)]
