# The latest round trip of each job peer, as its node measured it (meshnet.round_trips).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('meshnet', '0022_buyer_key_group_constraints'),
    ]

    operations = [
        migrations.AddField(
            model_name='jobpeer',
            name='rtt_measured_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='jobpeer',
            name='rtt_us',
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
    ]
