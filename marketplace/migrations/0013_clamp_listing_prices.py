"""Listing prices stored above the ceiling before it existed (marketplace.money.MAX_PRICE,
10,000 USD per GPU-hour or per GiB) are brought down to it, so the next migration can add the
database's own check. A listing so priced could never be ordered (its hold overflowed); at the
ceiling it still is not worth ordering, and its provider sees the price changed. Its own
migration, apart from the constraint: PostgreSQL refuses an ALTER TABLE in a transaction that
updated the table's rows while it has deferred triggers."""

from django.db import migrations

MAX_PRICE = 10_000 * 1_000_000  # as marketplace.money.MAX_PRICE was when this was written


def clamp_prices(apps, schema_editor):
    Listing = apps.get_model("marketplace", "Listing")
    Listing.objects.filter(price_per_gpu_hour__gt=MAX_PRICE).update(price_per_gpu_hour=MAX_PRICE)
    Listing.objects.filter(price_per_gib__gt=MAX_PRICE).update(price_per_gib=MAX_PRICE)


class Migration(migrations.Migration):
    dependencies = [("marketplace", "0012_api_token_staff_code")]

    operations = [migrations.RunPython(clamp_prices, migrations.RunPython.noop)]
