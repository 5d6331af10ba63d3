"""Job sandboxes: a job's container on a provider node, with exactly its GPUs, its own address
of the node's sandbox /27 and its buyer's SSH keys, added and removed in the same desired
revisions as the job's peer (meshnet.peers calls in here), and where it stands as the node's
agent reports it (SANDBOX_STATUS, through meshnet.agent_channel).

When a sandbox's GPUs and address are freed: when its job peer is gone from the node (the ack
of the revision that removed both, or the REMOVED message after it; or a node closed out or
revoked), not when the revision that drops it is written. The agent removes the container
before the peer (docs/protocol.md), so "peer gone" proves "container gone": a GPU or address
handed to the next sandbox is never still held by the last one's container, even while the
agent is slow. Until then the GPUs stay taken (NotEnoughGpus says so, `transient`).

Lock order, everywhere in meshnet: node row, then pool row, then sandbox rows.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from clawnode import wire
from django.db import IntegrityError, transaction
from django.utils import timezone

from meshnet.allocation import allocate_sandbox_address, release_address
from meshnet.errors import MeshError, NotEnoughGpus
from meshnet.mesh import bump_members, members_of_groups
from meshnet.models import Gpu, JobPeer, Node, Sandbox, SandboxGpu
from meshnet.signals import sandbox_changed

log = logging.getLogger(__name__)

DEFAULT_PIDS_LIMIT = 4096


@dataclass(frozen=True)
class SandboxRequest:
    """What a job's sandbox should be: the image, how many of the node's GPUs, its limits
    (CPU in millicores), whether it may reach the internet, the buyer's SSH public keys."""

    image: str
    gpu_count: int
    cpus_milli: int
    memory_mb: int
    disk_gb: int
    egress: bool = True
    ssh_keys: tuple[str, ...] = ()
    pids_limit: int = DEFAULT_PIDS_LIMIT
    # Only GPUs of this model (as the node reports it: Gpu.name); None: any. A node with two
    # models lists each separately, and a job gets the model its listing offers.
    gpu_model: str | None = None
    # The job's private network (meshnet.mesh): "cluster:<id>" for a part of a multi-node order,
    # whose sandboxes reach each other across their nodes; "" for none.
    mesh_group: str = ""


def sandbox_spec(
    sandbox: Sandbox, gpus: Iterable[int], mesh: Iterable[str] = ()
) -> wire.SandboxSpec:
    """The signed desired state's view of `sandbox` (its GPU indexes given, sorted; `mesh`, the
    addresses of the other members of its group, meshnet.mesh)."""
    return wire.SandboxSpec(
        ref=sandbox.ref,
        image=sandbox.image,
        address=f"{sandbox.address}/32",
        peer_address=f"{sandbox.peer_address}/32",
        gpus=tuple(sorted(gpus)),
        cpus=sandbox.cpus_milli,
        memory_mb=sandbox.memory_mb,
        disk_gb=sandbox.disk_gb,
        pids_limit=sandbox.pids_limit,
        egress=sandbox.egress,
        ssh_keys=tuple(sandbox.ssh_keys),
        mesh=tuple(f"{a}/32" for a in sorted(set(mesh), key=ipaddress.IPv4Address)),
    )


def live_specs(node: Node) -> tuple[wire.SandboxSpec, ...]:
    """Every sandbox `node` should run at its desired revision (removed_revision unset)."""
    return live_specs_of([node.pk])[node.pk]


def live_specs_of(node_pks: Iterable[int]) -> dict[int, tuple[wire.SandboxSpec, ...]]:
    """live_specs of many nodes in three queries, whatever their number (a change pushed to
    every node computes them all: meshnet.desired_state.signed_desired_states). A sandbox of a
    group lists the group's other live members, on any node (meshnet.mesh)."""
    pks = list(node_pks)
    boxes = list(
        Sandbox.objects.filter(node_id__in=pks, removed_revision__isnull=True).order_by("id")
    )
    gpus: dict[int, list[int]] = {box.pk: [] for box in boxes}
    for sandbox_id, index in SandboxGpu.objects.filter(sandbox__in=boxes).values_list(
        "sandbox_id", "index"
    ):
        gpus[sandbox_id].append(index)
    members = members_of_groups(box.mesh_group for box in boxes)
    specs: dict[int, list[wire.SandboxSpec]] = {pk: [] for pk in pks}
    for box in boxes:
        mates = [a for _, a in members.get(box.mesh_group, ()) if a != str(box.address)]
        specs[box.node_id].append(sandbox_spec(box, gpus[box.pk], mates))
    return {pk: tuple(found) for pk, found in specs.items()}


def _free_gpu_indexes(node: Node, model: str | None = None) -> tuple[list[int], int]:
    """(free GPU indexes of `node` (of `model` if given) in order, how many more are held by
    sandboxes leaving)."""
    held = dict(
        SandboxGpu.objects.filter(node=node).values_list("index", "sandbox__removed_revision")
    )
    gpus = Gpu.objects.filter(node=node)
    if model is not None:
        gpus = gpus.filter(name=model)
    inventory = list(gpus.order_by("index").values_list("index", flat=True))
    free = [index for index in inventory if index not in held]
    leaving = sum(1 for index in inventory if index in held and held[index] is not None)
    return free, leaving


def add_sandbox(node: Node, peer: JobPeer, request: SandboxRequest) -> Sandbox:
    """Write `peer`'s sandbox at the peer's added revision: the first `gpu_count` free GPUs of
    `node` (by index; a GPU is free when no SandboxGpu holds it), an address of the node's
    sandbox /27, the Sandbox and its SandboxGpu rows. Call only from meshnet.peers, inside the
    transaction that holds `node`'s row and adds `peer` (one revision for both).

    Raises NotEnoughGpus when too few are free (`transient` when sandboxes leaving hold the
    rest), also when the gpu_one_sandbox_at_a_time constraint refuses one (a race the node
    lock should prevent: the constraint decides, nothing is written); MeshError naming the
    field when the request would not make a valid SandboxSpec; PoolExhausted."""
    if request.gpu_count < 1:
        raise MeshError("gpu_count must be at least 1")
    free, leaving = _free_gpu_indexes(node, request.gpu_model)
    if len(free) < request.gpu_count:
        what = f"{request.gpu_model} GPU(s)" if request.gpu_model else "GPU(s)"
        raise NotEnoughGpus(
            f"{node.name} has {len(free)} free {what}, {request.gpu_count} asked"
            + (f"; {leaving} more are being freed by jobs that ended" if leaving else ""),
            transient=len(free) + leaving >= request.gpu_count,
        )
    chosen = free[: request.gpu_count]
    lease = allocate_sandbox_address(node)
    sandbox = Sandbox(
        node=node,
        ref=peer.ref,
        address=lease.address,
        allocation=lease,
        peer_address=peer.address,
        image=request.image,
        cpus_milli=request.cpus_milli,
        memory_mb=request.memory_mb,
        disk_gb=request.disk_gb,
        pids_limit=request.pids_limit,
        egress=request.egress,
        ssh_keys=list(request.ssh_keys),
        added_revision=peer.added_revision,
        mesh_group=request.mesh_group,
    )
    try:
        # Checked as the agent will check it: a request the wire refuses would make the node's
        # whole desired state unsignable, so it is refused here, naming its field.
        sandbox_spec(sandbox, chosen)
    except wire.ProtocolError as exc:
        raise MeshError(f"sandbox {exc}") from None
    try:
        with transaction.atomic():
            sandbox.save(force_insert=True)
            SandboxGpu.objects.bulk_create(
                [SandboxGpu(sandbox=sandbox, node=node, index=index) for index in chosen]
            )
    except IntegrityError:
        raise NotEnoughGpus(
            f"GPU(s) {chosen} of {node.name} were just given to another job", transient=True
        ) from None
    log.info("sandbox %s on %s: GPUs %s, %s", peer.ref, node.name, chosen, sandbox.address)
    # The group's other nodes get a peer to this one (or its address in the peer they have)
    bump_members(sandbox.mesh_group, besides=node.pk)
    return sandbox


def mark_removed(ref: str, revision: int) -> None:
    """Drop the sandbox named `ref` from desired state at `revision` (the revision that drops
    its peer), and bump the other nodes of its group (their peer to this node loses its
    address, or goes). Its GPUs and address stay taken until the peer is gone
    (release_sandboxes). Call inside the transaction that holds its node's row."""
    box = Sandbox.objects.filter(ref=ref, removed_revision__isnull=True).first()
    if box is None:
        return
    Sandbox.objects.filter(pk=box.pk).update(removed_revision=revision)
    bump_members(box.mesh_group, besides=box.node_id)


def release_sandboxes(node: Node, refs: Iterable[str], at: datetime | None = None) -> int:
    """The job peers named `refs` are gone from `node`, so their sandboxes' containers are too:
    free their GPUs, put their addresses into (the sandbox) quarantine, and mark those not yet
    stopped or failed `stopped` (and out of desired state, for a revoked node's). Idempotent.
    Returns how many sandboxes were released. Call inside the transaction that holds `node`'s
    row."""
    at = at or timezone.now()
    boxes = list(
        Sandbox.objects.select_for_update(of=("self",))
        .filter(node=node, ref__in=list(refs))
        .select_related("allocation")
        .order_by("id")
    )
    if not boxes:
        return 0
    revision = Node.objects.values_list("desired_revision", flat=True).get(pk=node.pk)
    SandboxGpu.objects.filter(sandbox__in=boxes).delete()
    for box in boxes:
        if box.allocation is not None:
            release_address(box.allocation)
        if Sandbox.objects.filter(pk=box.pk, removed_revision__isnull=True).update(
            removed_revision=revision
        ):
            # Still desired until now (a revoked or closed-out node's): its group's other
            # nodes drop it from their peer to this node.
            bump_members(box.mesh_group, besides=node.pk)
        if (
            Sandbox.objects.filter(pk=box.pk)
            .exclude(state__in=TERMINAL)
            .update(state=Sandbox.State.STOPPED, reported_at=at)
        ):
            _announce_on_commit(box.pk)
    return len(boxes)


# --- what the agent reports ----------------------------------------------------------------

TERMINAL = (Sandbox.State.STOPPED, Sandbox.State.FAILED)
_RANK = {
    Sandbox.State.PENDING: 0,
    Sandbox.State.PULLING: 1,
    Sandbox.State.STARTING: 2,
    Sandbox.State.READY: 3,
}


def record_sandbox_status(
    node: Node, status: wire.SandboxStatus, at: datetime | None = None
) -> int:
    """Take a node's (verified) SANDBOX_STATUS: each report updates the sandbox of `node` with
    its ref; a ref `node` has no sandbox of is logged and ignored (another node's sandboxes are
    never touched). States only move forward (pending, pulling, starting, ready), and nothing
    leaves stopped or failed: a report that would go back is ignored whole (a late copy).
    ready_at is set once, by the first ready report. detail, progress, gpus, host_keys and ports
    are stored as reported. After commit, sandbox_changed fires for each sandbox that changed.
    Returns how many changed. Locks: node row, then the sandboxes in id order."""
    at = at or timezone.now()
    reports = {report.ref: report for report in status.sandboxes}
    changed = 0
    with transaction.atomic():
        Node.objects.select_for_update().get(pk=node.pk)
        boxes = list(
            Sandbox.objects.select_for_update()
            .filter(node=node, ref__in=list(reports))
            .order_by("id")
        )
        unknown = set(reports) - {box.ref for box in boxes}
        if unknown:
            log.warning("node %s reports unknown sandbox(es) %s", node.name, sorted(unknown)[:8])
        for box in boxes:
            report = reports[box.ref]
            if not _may_move(box.state, report.state):
                log.info("sandbox %s: %s after %s ignored", box.ref, report.state, box.state)
                continue
            values = {
                "state": report.state,
                "detail": report.detail,
                "progress": report.progress,
                "gpus": [gpu.to_dict() for gpu in report.gpus],
                "host_keys": list(report.host_keys),
                "ports": list(report.ports),
                "reported_at": at,
            }
            if report.state == Sandbox.State.READY and box.ready_at is None:
                values["ready_at"] = at
            reported = {name: value for name, value in values.items() if name != "reported_at"}
            if all(getattr(box, name) == value for name, value in reported.items()):
                continue  # a repeat (a full report resends everything): nothing to announce
            Sandbox.objects.filter(pk=box.pk).update(**values)
            _announce_on_commit(box.pk)
            changed += 1
    return changed


def _may_move(current: str, reported: str) -> bool:
    if current in TERMINAL:
        return current == reported
    if reported in TERMINAL:
        return True
    return _RANK[Sandbox.State(reported)] >= _RANK[Sandbox.State(current)]


def _announce_on_commit(sandbox_pk: int) -> None:
    """sandbox_changed after commit, with the row as committed: a rolled-back report moves no
    order and tells no page. Robust: a receiver that fails is logged and does not cut the
    agent's connection over a report already recorded (marketplace's sweep re-drives an order
    whose sandbox is ready or failed: orders.expire_orders)."""

    def send() -> None:
        sandbox = Sandbox.objects.filter(pk=sandbox_pk).first()
        if sandbox is not None:
            sandbox_changed.send(sender=Sandbox, sandbox=sandbox)

    transaction.on_commit(send, robust=True)
