"""The relay process: one UDP socket per allocated port, Python forwarding for the first
packets of a pair, then the kernel (fastpath) once both sides have handshaken.

    python -m meshnet.relay --address 192.0.2.30 --ports 40000-40999 \
        --control https://gateway.example/api/relay/allocations/ --token-file /etc/molt/relay.token
    python -m meshnet.relay --address 192.0.2.30 --ports 40000-40999 --allocations pairs.json

Allocations (the pairs to serve, public keys only) come from the gateway's control API, asked
every --poll seconds with the relay's token as a bearer token, or from a JSON file re-read when
it changes (tests, or an operator without a gateway in reach). Either holds
`{"pairs": [{"id", "buyer_port", "provider_port", "buyer_key", "provider_key"}]}`. A pair
that disappears from the list is closed at once: its sockets, its route.

The process needs CAP_NET_ADMIN for the fast path (nft) and net.ipv4.ip_forward=1; without
either it logs why and forwards everything in Python (`--no-fast-path` asks for that).
Nothing secret is logged: the token is read from a file, never printed; keys are public.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import urllib.request
from pathlib import Path

from meshnet.relay import fastpath, pairs

log = logging.getLogger("molt.relay")


class _PortProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay, pair_id: str, side: str) -> None:
        self.relay, self.pair_id, self.side = relay, pair_id, side
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.relay.on_datagram(self.pair_id, self.side, data, (addr[0], addr[1]))


class Relay:
    def __init__(self, address: str, port_range: tuple[int, int], fast_path: bool) -> None:
        self.address = address
        self.port_range = port_range
        self.fast_path = fast_path
        self.pairs: dict[str, pairs.Pair] = {}
        self.ports: dict[str, dict[str, _PortProtocol]] = {}
        self.routes: dict[str, fastpath.Route] = {}
        self._zone = 0
        self._ruleset_dirty = True

    # -- allocations -------------------------------------------------------------------
    async def load(self, allocations: list[pairs.Allocation]) -> None:
        """Open sockets for new pairs, close those of pairs no longer listed."""
        wanted = {allocation.id: allocation for allocation in allocations}
        low, high = self.port_range
        closed = False
        for pair_id in list(self.pairs):
            if pair_id not in wanted or wanted[pair_id] != self.pairs[pair_id].allocation:
                self._close(pair_id)
                closed = True
        if closed:
            # A transport's close() only schedules the socket's close for the loop's next turn:
            # the gateway hands a freed pair's ports to the next order at once, and binding them
            # in this same turn failed (EADDRINUSE), leaving the new pair unopened until the
            # next poll. One turn lets the closes happen first.
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        for pair_id, allocation in wanted.items():
            if pair_id in self.pairs:
                continue
            if not all(low <= p <= high for p in (allocation.buyer_port, allocation.provider_port)):
                log.warning("pair %s: ports outside %s-%s, skipped", pair_id, low, high)
                continue
            protocols = {}
            try:
                for side, port in (
                    (pairs.BUYER, allocation.buyer_port),
                    (pairs.PROVIDER, allocation.provider_port),
                ):
                    _, protocol = await loop.create_datagram_endpoint(
                        lambda side=side, pair_id=pair_id: _PortProtocol(self, pair_id, side),
                        local_addr=(self.address, port),
                    )
                    protocols[side] = protocol
            except OSError as exc:
                log.warning("pair %s: cannot bind its ports: %s", pair_id, exc)
                for protocol in protocols.values():
                    protocol.transport.close()
                continue
            self.pairs[pair_id] = pairs.Pair(allocation)
            self.ports[pair_id] = protocols
            log.info(
                "pair %s: buyer port %s, provider port %s",
                pair_id,
                allocation.buyer_port,
                allocation.provider_port,
            )
        self.sync_fast_path()

    def _close(self, pair_id: str) -> None:
        for protocol in self.ports.pop(pair_id, {}).values():
            if protocol.transport is not None:
                protocol.transport.close()
        self.pairs.pop(pair_id, None)
        if self.routes.pop(pair_id, None) is not None:
            self._ruleset_dirty = True
        log.info("pair %s closed", pair_id)

    # -- forwarding --------------------------------------------------------------------
    def on_datagram(self, pair_id: str, side: str, data: bytes, source: pairs.Address) -> None:
        pair = self.pairs.get(pair_id)
        if pair is None:
            return
        route = self.routes.get(pair_id)
        if route is not None:
            known = route.buyer if side == pairs.BUYER else route.provider
            if source != known:
                # A side sends from a new address while the kernel forwards the old one: back
                # to Python until a handshake from the new address completes (pairs.py).
                del self.routes[pair_id]
                pair.handshaken = False
                self._ruleset_dirty = True
                self.sync_fast_path()
        destination, changed = pair.receive(side, source, data, time.monotonic())
        if changed and pair_id in self.routes:
            del self.routes[pair_id]
            self._ruleset_dirty = True
        if destination is not None:
            out = self.ports[pair_id][pair.other(side)].transport
            if out is not None:
                out.sendto(data, destination)
        if pair.handshaken and pair.both_known and pair_id not in self.routes:
            self._route(pair_id, pair)
        if self._ruleset_dirty:
            self.sync_fast_path()

    def _route(self, pair_id: str, pair: pairs.Pair) -> None:
        if not self.fast_path:
            return
        self._zone = self._zone % 65535 + 1
        buyer = pair.sides[pairs.BUYER].address
        provider = pair.sides[pairs.PROVIDER].address
        assert buyer is not None and provider is not None
        self.routes[pair_id] = fastpath.Route(
            zone=self._zone,
            buyer_port=pair.allocation.buyer_port,
            provider_port=pair.allocation.provider_port,
            buyer=buyer,
            provider=provider,
        )
        self._ruleset_dirty = True

    def sync_fast_path(self) -> None:
        if not self.fast_path or not self._ruleset_dirty:
            return
        text = fastpath.ruleset(self.address, self.port_range, list(self.routes.values()))
        try:
            fastpath.apply(text)
        except (OSError, RuntimeError) as exc:
            log.warning("fast path off, forwarding in Python only: %s", exc)
            self.fast_path = False
            self.routes.clear()
        self._ruleset_dirty = False

    def status(self) -> dict:
        kernel = fastpath.forwarded_bytes() if self.fast_path and self.routes else {}
        out = []
        for pair_id, pair in self.pairs.items():
            entry = pair.status()
            route = self.routes.get(pair_id)
            entry["fast_path"] = route is not None
            entry["kernel_bytes"] = kernel.get(route.zone, 0) if route is not None else 0
            out.append(entry)
        return {"address": self.address, "fast_path": self.fast_path, "pairs": out}

    def shutdown(self) -> None:
        for pair_id in list(self.pairs):
            self._close(pair_id)
        if self.fast_path:
            fastpath.remove()


# -- allocation sources ----------------------------------------------------------------
def parse_allocations(body: bytes) -> list[pairs.Allocation]:
    data = json.loads(body)
    return [pairs.Allocation.from_dict(entry) for entry in data["pairs"]]


def fetch_control(url: str, token: str, status: dict | None) -> list[pairs.Allocation]:
    """Ask the gateway for this relay's pairs, reporting its load on the same request."""
    body = json.dumps({"status": status or {}}).encode()
    request = urllib.request.Request(  # noqa: S310 (an operator-configured https URL)
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return parse_allocations(response.read())


async def serve(args: argparse.Namespace) -> None:
    low, high = (int(part) for part in args.ports.split("-"))
    relay = Relay(args.address, (low, high), fast_path=not args.no_fast_path)
    if relay.fast_path and Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
        log.warning("net.ipv4.ip_forward is 0: fast path off, forwarding in Python only")
        relay.fast_path = False
    token = Path(args.token_file).read_text().strip() if args.token_file else ""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last_mtime = None
    if relay.fast_path:
        relay.sync_fast_path()  # the notrack rules before the first socket opens
    while not stop.is_set():
        try:
            if args.allocations:
                mtime = os.stat(args.allocations).st_mtime_ns
                if mtime != last_mtime:
                    last_mtime = mtime
                    await relay.load(parse_allocations(Path(args.allocations).read_bytes()))
            else:
                allocations = await loop.run_in_executor(
                    None, fetch_control, args.control, token, relay.status()
                )
                await relay.load(allocations)
        except (OSError, ValueError, KeyError) as exc:
            # The gateway away or a bad file: keep serving the pairs we have.
            log.warning("allocations not refreshed: %s", exc)
        if args.status:
            tmp = Path(args.status + ".tmp")
            tmp.write_text(json.dumps(relay.status()))
            tmp.replace(args.status)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.poll)
    relay.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshnet.relay", description=__doc__)
    parser.add_argument("--address", required=True, help="the relay's public IPv4 address")
    parser.add_argument("--ports", default="40000-40999", help="UDP port range, LOW-HIGH")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--control", help="the gateway's relay control URL")
    source.add_argument("--allocations", help="a JSON file of pairs, re-read when it changes")
    parser.add_argument("--token-file", help="file holding this relay's token (with --control)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--status", help="write the relay's status JSON here every poll")
    parser.add_argument("--no-fast-path", action="store_true", help="forward in Python only")
    args = parser.parse_args(argv)
    if args.control and not args.token_file:
        parser.error("--control needs --token-file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args))
