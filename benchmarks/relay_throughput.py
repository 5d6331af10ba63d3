"""Bytes per second through the relay against a direct tunnel, in the same run.

    sudo .venv/bin/python benchmarks/relay_throughput.py [--repeat 5] [--mib 32]

(root; wireguard-go, wg, nft, ip; everything lives in namespaces of the NAT lab, removed after
the run: tests/nat/lab.py)

Two public sites (so a direct tunnel works and is the baseline) run wireguard-go; per repeat,
`--mib` MiB cross one TCP connection inside the tunnel (tests/nat/relay_helpers.py) on three
paths, in turn:

- direct: each side sends to the other's address (the baseline);
- relay, kernel: through `python -m meshnet.relay` with its nftables fast path (Python sees the
  handshake, the kernel forwards the rest);
- relay, python: the same relay with --no-fast-path (every packet through asyncio).

Each path's figure is the sender's wall time for the whole transfer (connect to the receiver's
close), as bytes/s. Prints one JSON object: per path the samples and p50/p90/min/max in MB/s,
and each relay path's p50 as a share of direct's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.nat import lab as nat_lab
from tests.nat import relayed, tunnel


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _point(lab, provider, buyer, provider_to: str, buyer_to: str) -> None:
    provider.set_peer(
        lab, buyer.public, "endpoint", provider_to, "persistent-keepalive", "1",
        "allowed-ips", f"{tunnel.BUYER_TUNNEL}/32",
    )  # fmt: skip
    buyer.set_peer(
        lab, provider.public, "endpoint", buyer_to, "persistent-keepalive", "1",
        "allowed-ips", f"{tunnel.PROVIDER_TUNNEL}/32",
    )  # fmt: skip


def _handshake_after(lab, provider, buyer, since: float) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        ok = (
            provider.handshakes(lab).get(buyer.public, 0) >= since
            and buyer.handshakes(lab).get(provider.public, 0) >= since
        )
        if ok:
            return
        time.sleep(0.05)
    raise RuntimeError("no handshake")


def _one_path(lab, path: str, size: int, repeat: int, workdir: Path) -> list[float]:
    public = nat_lab.KINDS_BY_NAME["public"]
    (provider_host,) = lab.site(public, nat_lab.PROVIDER_NET, ["p"])
    (buyer_host,) = lab.site(public, nat_lab.BUYER_NET, ["b"])
    sides = []
    try:
        provider = tunnel.start_wireguard(
            lab, provider_host.ns, "p", tunnel.PROVIDER_PORT, tunnel.PROVIDER_TUNNEL
        )
        sides.append(provider)
        buyer = tunnel.start_wireguard(
            lab, buyer_host.ns, "b", tunnel.BUYER_PORT, tunnel.BUYER_TUNNEL
        )
        sides.append(buyer)
        samples = []
        if path == "direct":
            _point(
                lab, provider, buyer,
                f"{buyer_host.address}:{tunnel.BUYER_PORT}",
                f"{provider_host.address}:{tunnel.PROVIDER_PORT}",
            )  # fmt: skip
            _handshake_after(lab, provider, buyer, 1)
            samples = _transfers(lab, provider, buyer, size, repeat)
        else:
            fast = path == "relay, kernel"
            with relayed.relay(lab, workdir / path.replace(", ", "-"), fast_path=fast) as relay:
                buyer_port, provider_port = relay.allocate("bench", buyer.public, provider.public)
                at = relayed.RELAY_ADDRESS
                _point(lab, provider, buyer, f"{at}:{provider_port}", f"{at}:{buyer_port}")
                _handshake_after(lab, provider, buyer, 1)
                samples = _transfers(lab, provider, buyer, size, repeat)
                status = relay.pair_status("bench")
                if fast and not (status and status["fast_path"]):
                    raise RuntimeError(f"the kernel path was not taken: {status}")
        return samples
    finally:
        for side in sides:
            side.stop()
        lab.release_sites()


def _transfers(lab, provider, buyer, size: int, repeat: int) -> list[float]:
    rates = []
    for _ in range(repeat):
        moved = relayed.move_bytes(lab, buyer.ns, provider.ns, tunnel.PROVIDER_TUNNEL, size)
        if moved["received"] != size:
            raise RuntimeError(f"short transfer: {moved}")
        rates.append(size / moved["seconds"] / 1e6)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mib", type=int, default=32)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    results = {}
    with nat_lab.nat_lab() as lab, tempfile.TemporaryDirectory() as tmp:
        for path in ("direct", "relay, kernel", "relay, python"):
            rates = _one_path(lab, path, size, args.repeat, Path(tmp))
            results[path] = {
                "samples_MBps": [round(rate, 2) for rate in rates],
                "p50_MBps": percentile(rates, 0.5),
                "p90_MBps": percentile(rates, 0.9),
                "min_MBps": min(rates),
                "max_MBps": max(rates),
            }
    direct = results["direct"]["p50_MBps"]
    print(
        json.dumps(
            {
                "bytes_per_transfer": size,
                "repeat": args.repeat,
                "paths": results,
                "p50_share_of_direct": {
                    path: round(results[path]["p50_MBps"] / direct, 3)
                    for path in ("relay, kernel", "relay, python")
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
