# 0020's backfill, in a migration of its own: Django creates 0020's foreign-key indexes at the
# end of that migration, and on PostgreSQL an UPDATE of meshnet_jobpeer in the same transaction
# leaves deferred trigger events that refuse them ("pending trigger events"). Existing peers
# become groups of one; each open key gets its node.
from django.db import migrations, models


def backfill(apps, schema_editor):
    JobPeer = apps.get_model("meshnet", "JobPeer")
    JobPeerKey = apps.get_model("meshnet", "JobPeerKey")
    PeerKeyClaim = apps.get_model("meshnet", "PeerKeyClaim")
    JobPeer.objects.update(key_group=models.F("ref"))
    for peer in JobPeer.objects.exclude(state="removed").only("pk", "public_key", "ref"):
        token = f"{peer.public_key} {peer.ref}"
        PeerKeyClaim.objects.create(public_key=peer.public_key, group=peer.ref, token=token)
        JobPeer.objects.filter(pk=peer.pk).update(key_claim_id=token)
    for peer_id, node_id in JobPeer.objects.values_list("pk", "node_id"):
        JobPeerKey.objects.filter(job_peer_id=peer_id).update(node_id=node_id)


class Migration(migrations.Migration):
    dependencies = [
        ("meshnet", "0020_buyer_key_groups"),
    ]

    operations = [
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
