"""The sandboxes of an agent started without a sandbox engine (`clawnode run` without
--sandbox-engine): Sandboxes' interface, running nothing."""

from __future__ import annotations

from .. import wire


class NoSandboxes:
    """The sandboxes of an agent started without a sandbox engine: none run, and each one a
    desired state asks for is reported failed, so its order fails instead of waiting."""

    DETAIL = "this node runs no sandboxes"

    def __init__(self) -> None:
        self._failed: dict[str, wire.SandboxReport] = {}
        self._unreported: set[str] = set()

    def apply(self, desired: tuple[wire.SandboxSpec, ...]) -> None:
        wanted = {box.ref for box in desired}
        for ref in wanted - set(self._failed):
            self._failed[ref] = wire.SandboxReport(ref=ref, state="failed", detail=self.DETAIL)
            self._unreported.add(ref)
        for ref in set(self._failed) - wanted:
            del self._failed[ref]
            self._unreported.discard(ref)

    def reports(self, *, changed_only: bool) -> list[wire.SandboxReport]:
        refs = sorted(self._unreported if changed_only else self._failed)
        self._unreported.clear()
        return [self._failed[ref] for ref in refs]
