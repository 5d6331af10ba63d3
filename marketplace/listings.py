"""Listings: a provider offers GPUs of one model of one node at a price. One transaction each.

Locks: the listing row, then the node row (the store-wide order: node rows before anything an
order owns; see marketplace.orders).
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from marketplace.errors import MarketError, Oversold
from marketplace.models import Listing, Order
from marketplace.money import MAX_PRICE, format_usd
from meshnet import ipplan
from meshnet.models import Node

# What a job gets per GPU ordered and per job, as a listing may set it (docs/provider.md).
LIMITS = {
    "cpus_per_gpu": (1, 256),
    "memory_gb_per_gpu": (1, 4096),
    "disk_gb": (1, 100_000),
}


def _check_limits(values: dict[str, int | None]) -> None:
    for name, value in values.items():
        low, high = LIMITS[name]
        if value is not None and not low <= value <= high:
            raise MarketError(f"{name} must be between {low} and {high}", field=name)


def _check_images(node: Node, images: list[str]) -> list[str]:
    """`images` as a listing keeps them: each one the node reports it can run, no repeats, in
    the provider's order (the first is what an order gets by default)."""
    if not isinstance(images, list | tuple) or not all(isinstance(i, str) for i in images):
        raise MarketError("images must be a list of image names", field="images")
    offered = list(node.images or [])
    unknown = [image for image in images if image not in offered]
    if unknown:
        runs = ", ".join(offered) if offered else "none reported yet"
        raise MarketError(
            f"{node.name} does not run {', '.join(unknown)} (it runs: {runs})", field="images"
        )
    return list(dict.fromkeys(images))


def _check_price(name: str, price: int) -> None:
    """Prices are whole micro-USD from 0 to money.MAX_PRICE, checked where they enter, so no
    hold or settlement computed from them can overflow."""
    if type(price) is not int:
        raise MarketError(f"{name} must be a whole number of millionths of a dollar", field=name)
    if price < 0:
        raise MarketError(f"{name} must not be negative", field=name)
    if price > MAX_PRICE:
        raise MarketError(f"{name} must be at most {format_usd(MAX_PRICE)}", field=name)


def create_listing(
    owner,
    *,
    node: Node,
    gpu_count: int,
    price_per_gpu_hour: int,
    price_per_gib: int,
    gpu_model: str | None = None,
    region: str | None = None,
    images: list[str] | None = None,
    cpus_per_gpu: int | None = None,
    memory_gb_per_gpu: int | None = None,
    disk_gb: int | None = None,
    egress: bool | None = None,
) -> Listing:
    """List `gpu_count` GPUs of one model of `owner`'s node. The model and VRAM come from the
    node's reported GPUs; with several models on the node, `gpu_model` picks one. `images`
    must each be one the node reports (Node.images); None offers all of them. Limits left None
    take the model's defaults. Locks: node row, so two listings cannot together offer more GPUs
    than the node has."""
    if node.owner_id != owner.pk or node.revoked_at is not None:
        raise MarketError("unknown node", field="node")
    if gpu_count < 1:
        raise MarketError("gpu_count must be at least 1", field="gpu_count")
    _check_price("price_per_gpu_hour", price_per_gpu_hour)
    _check_price("price_per_gib", price_per_gib)
    if region and region not in ipplan.REGIONS:
        raise MarketError(
            f"unknown region {region!r}; one of {', '.join(ipplan.REGIONS)}", field="region"
        )
    if region and region != node.region:
        # A listing's region is its node's, declared at `clawnode join --region` and where the
        # node's mesh address is: a listing cannot claim another one.
        raise MarketError(
            f"a listing's region is its node's ({node.region or 'none'}); "
            "the node's region is set when it joins (clawnode join --region)",
            field="region",
        )
    _check_limits(
        {"cpus_per_gpu": cpus_per_gpu, "memory_gb_per_gpu": memory_gb_per_gpu, "disk_gb": disk_gb}
    )
    with transaction.atomic():
        node = Node.objects.select_for_update().get(pk=node.pk)
        images = _check_images(node, list(node.images or []) if images is None else images)
        gpus = list(node.gpus.all())
        models = sorted({gpu.name for gpu in gpus})
        if not models:
            raise MarketError(f"{node.name} reports no GPUs", field="node")
        if gpu_model is None:
            if len(models) > 1:
                raise MarketError(
                    f"{node.name} has several GPU models ({', '.join(models)}): choose gpu_model",
                    field="gpu_model",
                )
            gpu_model = models[0]
        matching = [gpu for gpu in gpus if gpu.name == gpu_model]
        if not matching:
            raise MarketError(f"{node.name} has no {gpu_model!r} GPU", field="gpu_model")
        listed = sum(
            Listing.objects.visible()
            .filter(node=node, gpu_model=gpu_model)
            .values_list("gpu_count", flat=True)
        )
        if listed + gpu_count > len(matching):
            raise MarketError(
                f"{node.name} has {len(matching)} {gpu_model} GPU(s), {listed} already listed",
                field="gpu_count",
            )
        return Listing.objects.create(
            owner=owner,
            node=node,
            gpu_model=gpu_model,
            vram_gb=min(gpu.vram_gb for gpu in matching),
            gpu_count=gpu_count,
            price_per_gpu_hour=price_per_gpu_hour,
            price_per_gib=price_per_gib,
            region=node.region,
            simulated=any(gpu.simulated for gpu in matching),
            images=images,
            **{
                name: value
                for name, value in (
                    ("cpus_per_gpu", cpus_per_gpu),
                    ("memory_gb_per_gpu", memory_gb_per_gpu),
                    ("disk_gb", disk_gb),
                    ("egress", egress),
                )
                if value is not None
            },
        )


def update_listing(
    listing: Listing,
    *,
    price_per_gpu_hour: int | None = None,
    price_per_gib: int | None = None,
    gpu_count: int | None = None,
    is_active: bool | None = None,
    images: list[str] | None = None,
    cpus_per_gpu: int | None = None,
    memory_gb_per_gpu: int | None = None,
    disk_gb: int | None = None,
    egress: bool | None = None,
) -> Listing:
    """Change a listing's prices, GPU count, active flag (False pauses it: no new orders;
    live orders are untouched, and they keep the prices they were placed at), images (each one
    the node reports), per-GPU CPU and memory, disk per job, or egress (new orders only).

    A new gpu_count is checked like create_listing's: with the node's other listings of this
    model it must fit the node's GPUs of the model, and it cannot go below the GPUs live orders
    use (Oversold, 409). Locks: listing row, then node row (the store-wide order). A deleted
    listing raises MarketError."""
    if gpu_count is not None and gpu_count < 1:
        raise MarketError("gpu_count must be at least 1", field="gpu_count")
    for name, price in (
        ("price_per_gpu_hour", price_per_gpu_hour),
        ("price_per_gib", price_per_gib),
    ):
        if price is not None:
            _check_price(name, price)
    _check_limits(
        {"cpus_per_gpu": cpus_per_gpu, "memory_gb_per_gpu": memory_gb_per_gpu, "disk_gb": disk_gb}
    )
    with transaction.atomic():
        locked = Listing.objects.visible().select_for_update().filter(pk=listing.pk).first()
        if locked is None:
            raise MarketError(f"unknown listing {listing.pk}", field="listing")
        changes: dict[str, object] = {}
        if gpu_count is not None and gpu_count != locked.gpu_count:
            node = Node.objects.select_for_update().get(pk=locked.node_id)
            in_use = Order.objects.gpus_in_use(locked.pk)
            if gpu_count < in_use:
                raise Oversold(f"{in_use} GPUs of this listing are in use by live orders")
            matching = node.gpus.filter(name=locked.gpu_model).count()
            others = sum(
                Listing.objects.visible()
                .filter(node=node, gpu_model=locked.gpu_model)
                .exclude(pk=locked.pk)
                .values_list("gpu_count", flat=True)
            )
            if others + gpu_count > matching:
                raise MarketError(
                    f"{node.name} has {matching} {locked.gpu_model} GPU(s), "
                    f"{others} listed elsewhere",
                    field="gpu_count",
                )
            changes["gpu_count"] = gpu_count
        if price_per_gpu_hour is not None:
            changes["price_per_gpu_hour"] = price_per_gpu_hour
        if price_per_gib is not None:
            changes["price_per_gib"] = price_per_gib
        if is_active is not None:
            changes["is_active"] = is_active
        if images is not None:
            node = Node.objects.select_for_update().get(pk=locked.node_id)
            changes["images"] = _check_images(node, images)
        for name, value in (
            ("cpus_per_gpu", cpus_per_gpu),
            ("memory_gb_per_gpu", memory_gb_per_gpu),
            ("disk_gb", disk_gb),
            ("egress", egress),
        ):
            if value is not None:
                changes[name] = value
        if changes:
            Listing.objects.filter(pk=locked.pk).update(**changes)
        locked.refresh_from_db()
        return locked


def delete_listing(listing: Listing) -> None:
    """Soft delete: orders keep pointing at the listing they bought from."""
    Listing.objects.filter(pk=listing.pk).update(deleted_at=timezone.now(), is_active=False)
