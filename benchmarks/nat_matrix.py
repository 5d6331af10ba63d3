"""Time to a direct WireGuard handshake across the NAT lab's kinds, and what ordering saves.

    .venv/bin/python benchmarks/nat_matrix.py [--repeat 3] [--stagger 0.2] [--cells P:B ...]

(root; needs wireguard-go, wg, nft, ip; everything lives in namespaces made for the run and
removed after it, even on failure: tests/nat/lab.py)

Plain wireguard-go and `wg`, no MOLT code (tests/nat/tunnel.py): per cell, a provider site and
a buyer site behind their NAT kinds, a hub that learns both public mappings, then each side is
given the other's mapping with keepalive. Three ways to send, each `--repeat` times per cell:

- simultaneous: both `wg set`s start together (the matrix test's way);
- provider first: the buyer's `wg set` `--stagger` seconds after the provider's;
- buyer first: the other way round.

Figure: from the first `wg set` to both sides showing a handshake with the other (polled every
20 ms), and whether there was one within 12 s. Baseline in the same run: public x public,
simultaneous. Prints one JSON object: per cell and way, the times (null: no handshake, the cell
needs a relay); per way, p50/p95 over the cells that connected and the share of those that paid
a lost first initiation (over 1 s: wireguard-go retries every 5 s). Default cells: the whole
6 x 6 matrix, about 5 minutes per repeat on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.nat import lab as nat_lab
from tests.nat import tunnel

WAYS = {
    "simultaneous": {"stagger_s": 0.0},
    "provider first": {"first": "provider"},
    "buyer first": {"first": "buyer"},
}


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--stagger", type=float, default=0.2)
    parser.add_argument("--cells", nargs="*", help="provider:buyer kind names; default all")
    args = parser.parse_args()
    if args.cells:
        pairs = [tuple(cell.split(":")) for cell in args.cells]
    else:
        pairs = list(itertools.product([kind.name for kind in nat_lab.KINDS], repeat=2))
    results: dict[str, dict[str, list[float | None]]] = {}
    started = time.monotonic()
    with nat_lab.nat_lab() as lab, tunnel.hub(lab) as the_hub:
        baseline = []
        for _ in range(args.repeat):
            public = nat_lab.KINDS_BY_NAME["public"]
            baseline.append(tunnel.run_cell(lab, the_hub, public, public).seconds)
        for provider, buyer in pairs:
            per_way = results.setdefault(f"{provider} x {buyer}", {})
            for way, options in WAYS.items():
                stagger = {} if way == "simultaneous" else {"stagger_s": args.stagger}
                for _ in range(args.repeat):
                    cell = tunnel.run_cell(
                        lab,
                        the_hub,
                        nat_lab.KINDS_BY_NAME[provider],
                        nat_lab.KINDS_BY_NAME[buyer],
                        **{**options, **stagger},
                    )
                    per_way.setdefault(way, []).append(cell.seconds)
    summary = {}
    for way in WAYS:
        times = [t for cell in results.values() for t in cell[way] if t is not None]
        summary[way] = {
            "connected": len(times),
            "tries": sum(len(cell[way]) for cell in results.values()),
            "p50_s": percentile(times, 0.5),
            "p95_s": percentile(times, 0.95),
            "paid_a_retry": sum(t > 1 for t in times),
        }
    known = [t for t in baseline if t is not None]
    print(
        json.dumps(
            {
                "seconds": round(time.monotonic() - started, 1),
                "stagger_s": args.stagger,
                "baseline_public_x_public_s": {
                    "p50": statistics.median(known) if known else None,
                    "runs": baseline,
                },
                "summary": summary,
                "cells": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
