"""Every provider NAT kind against every buyer NAT kind, with plain wireguard-go and `wg`, and
MOLT's relay (`python -m meshnet.relay`) where no punch can work.

The hub learns both mappings, each side is given the other's, one side 0.3 s after the other
(the endpoint-dependent side second, as the punching coordinator must order them: docs/nat.md),
and the cell records whether a handshake happened and how long it took from the first side's
`wg set`. The cells RFC 4787 lets through must connect directly, and pass a ping; the others
must not (a cell that connects where RFC 4787 says it cannot would mean a NAT of the lab is not
what its name says), and must then connect through the relay, pass a ping and move 8 MB. The
table is printed (run with -s) and written to test-artifacts/nat/matrix.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from tests.nat import lab as nat_lab
from tests.nat import relayed, tunnel

pytestmark = [pytest.mark.nat]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "nat"


RELAYED_BYTES = 8 * 1024 * 1024


# How long the second side waits after the first side's `wg set` (docs/nat.md, "The order of
# the sends"): two wireguard-go peers whose initiations cross can finish with a session that
# both sides count as a handshake but one side cannot decrypt, which keeps carrying nothing
# while each side's keepalives satisfy the other's timers (CI failed twice on it).
STAGGER_S = 0.3


def first_sender(provider: nat_lab.Kind, buyer: nat_lab.Kind) -> str:
    """The side that sends first: the endpoint-dependent side must send second, once the other
    side has the peer and has sent toward it (measured in docs/nat.md); otherwise the provider."""
    return "buyer" if provider.mapping is nat_lab.EDM else "provider"


def test_matrix(lab, tmp_path):
    started = time.monotonic()
    cells = []
    with tunnel.hub(lab) as the_hub, relayed.relay(lab, tmp_path / "relay") as the_relay:
        for provider_kind in nat_lab.KINDS:
            for buyer_kind in nat_lab.KINDS:
                cells.append(
                    tunnel.run_cell(
                        lab, the_hub, provider_kind, buyer_kind,
                        stagger_s=STAGGER_S, first=first_sender(provider_kind, buyer_kind),
                        relay=the_relay, relay_bytes=RELAYED_BYTES,
                    )
                )  # fmt: skip
        site = nat_lab.HAIRPIN_SITE
        # Staggered too, for a reason of the kernel's own besides: two hairpinned flows created
        # in the same instant race in conntrack, and Linux resolves the clash by giving the
        # second a random source port, which is no mapping of the NAT, so the tunnel handshakes
        # and then carries nothing (failed CI once, as in test_classify.test_hairpin).
        cells.append(tunnel.run_cell(lab, the_hub, site, site, stagger_s=STAGGER_S))
    elapsed = time.monotonic() - started
    names = [kind.name for kind in nat_lab.KINDS]
    printed = tunnel.table(cells, names)
    print(f"\n{printed}\n({len(cells)} cells in {elapsed:.0f} s)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "matrix.json").write_text(
        json.dumps(
            {
                "seconds": elapsed,
                "cells": [{**dataclasses.asdict(cell), "path": cell.path} for cell in cells],
            },
            indent=2,
        )
    )
    wrong = [
        f"{cell.provider} x {cell.buyer}: expected "
        f"{'direct' if cell.expected_direct else 'no direct path'}, got {cell.label}"
        for cell in cells
        if cell.direct != cell.expected_direct
    ]
    assert not wrong, "\n".join(wrong) + "\n" + printed
    no_ping = [
        f"{cell.provider} x {cell.buyer}" for cell in cells if cell.direct and not cell.pinged
    ]
    assert not no_ping, f"handshake but no ping across: {no_ping}"
    # Every cell no punch can open goes through the relay, with pings and 8 MB across.
    not_relayed = [
        f"{cell.provider} x {cell.buyer}: {cell.label}, ping {cell.relayed_pinged}, "
        f"{cell.relayed_bytes} bytes"
        for cell in cells
        if not cell.direct
        and not (
            cell.path == "relayed" and cell.relayed_pinged and cell.relayed_bytes == RELAYED_BYTES
        )
    ]
    assert not not_relayed, "\n".join(not_relayed) + "\n" + printed
    assert sum(cell.path == "relayed" for cell in cells) == 5, printed
    # Each side's mapping as the hub saw it is a public address of its own site's network.
    for cell in cells:
        assert cell.provider_mapping.startswith(nat_lab.PROVIDER_NET + "."), cell
        if cell.provider != "hairpin":
            assert cell.buyer_mapping.startswith(nat_lab.BUYER_NET + "."), cell
    # The tunnel runs between the two mappings: towards an endpoint-independent side, exactly
    # the one the hub saw (what MOLT's discovery relies on); towards an endpoint-dependent one,
    # the same address from another port (why the hub's view alone cannot reach it).
    for cell in cells:
        if not cell.direct:
            continue
        for seen, mapping, kind_name in (
            (cell.provider_sees, cell.buyer_mapping, cell.buyer),
            (cell.buyer_sees, cell.provider_mapping, cell.provider),
        ):
            kind = nat_lab.KINDS_BY_NAME.get(kind_name)
            if kind is None or kind.mapping is nat_lab.EIM:
                assert seen == mapping, cell
            else:
                assert seen != mapping, cell
                assert seen.rpartition(":")[0] == mapping.rpartition(":")[0], cell
