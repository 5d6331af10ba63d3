"""The relay process: a UDP socket on every port of its range, Python forwarding for the first
packets of a pair, then the kernel (fastpath) once both sides have handshaken.

    python -m meshnet.relay --address 192.0.2.30 --ports 40000-40999 \
        --control https://gateway.example/api/relay/allocations/ --token-file /etc/molt/relay.token
    python -m meshnet.relay --address 192.0.2.30 --ports 40000-40999 --allocations pairs.json

Allocations (the pairs to serve, public keys only) come from the gateway's control API, asked
every --poll seconds with the relay's token as a bearer token, or from a JSON file re-read when
it changes (tests, or an operator without a gateway in reach). Either holds
`{"pairs": [{"id", "buyer_port", "provider_port", "buyer_key", "provider_key"}]}`. A pair
that disappears from the list is closed at once: its ports go back to the range, its route.

Every port of the range is bound at start (`Relay.open_ports`), not when its pair arrives: the
gateway hands a pair's ports to the node and the buyer at once, and the relay learns the pair
on its next poll, up to a second later. A first handshake initiation sent before then hit a port
nobody listened on, and wireguard-go retries only after 5 s (the product matrix's relayed cells
that took 6 s). Now the latest initiation to a port without a pair is kept (one per port) and
handed to the pair when it arrives, which places that side as its first packet would have.

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
import resource
import signal
import time
import urllib.request
from pathlib import Path

from meshnet.relay import fastpath, pairs, wgmsg

log = logging.getLogger("molt.relay")


class _PortProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay, port: int) -> None:
        self.relay, self.port = relay, port

    def datagram_received(self, data: bytes, addr) -> None:
        self.relay.on_datagram(self.port, data, (addr[0], addr[1]))


class Relay:
    def __init__(self, address: str, port_range: tuple[int, int], fast_path: bool) -> None:
        self.address = address
        self.port_range = port_range
        self.fast_path = fast_path
        self.pairs: dict[str, pairs.Pair] = {}
        self.sockets: dict[int, asyncio.DatagramTransport] = {}
        self.owners: dict[int, tuple[str, str]] = {}  # port -> (pair id, side)
        # port -> (the latest initiation to it before its pair arrived, its source, when)
        self.early: dict[int, tuple[bytes, pairs.Address, float]] = {}
        self.routes: dict[str, fastpath.Route] = {}
        self._zone = 0
        self._ruleset_dirty = True

    # -- ports -------------------------------------------------------------------------
    async def open_ports(self) -> int:
        """Bind every port of the range (see the module's docstring); returns how many. A port
        that cannot be bound now (another process holds it) is tried again when a pair needs it.
        Raises the soft limit on open files to what the range needs, within the hard limit."""
        low, high = self.port_range
        _raise_file_limit(high - low + 1 + 64)
        opened = failed = 0
        for port in range(low, high + 1):
            if await self._bind(port, quiet=True):
                opened += 1
            else:
                failed += 1
        if failed:
            log.warning(
                "%s of the range's ports could not be bound now: tried again per pair", failed
            )
        return opened

    async def _bind(self, port: int, quiet: bool = False) -> bool:
        if port in self.sockets:
            return True
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _PortProtocol(self, port), local_addr=(self.address, port)
            )
        except OSError as exc:
            if not quiet:
                log.warning("port %s: cannot bind it: %s", port, exc)
            return False
        self.sockets[port] = transport
        return True

    # -- allocations -------------------------------------------------------------------
    async def load(self, allocations: list[pairs.Allocation]) -> None:
        """Serve the pairs listed, stop serving the others (their ports stay bound)."""
        wanted = {allocation.id: allocation for allocation in allocations}
        low, high = self.port_range
        for pair_id in list(self.pairs):
            if pair_id not in wanted or wanted[pair_id] != self.pairs[pair_id].allocation:
                self._close(pair_id)
        for pair_id, allocation in wanted.items():
            if pair_id in self.pairs:
                continue
            ports = {side: allocation.port(side) for side in (pairs.BUYER, pairs.PROVIDER)}
            if not all(low <= port <= high for port in ports.values()):
                log.warning("pair %s: ports outside %s-%s, skipped", pair_id, low, high)
                continue
            if any(port in self.owners for port in ports.values()):
                log.warning("pair %s: a port another pair serves, skipped", pair_id)
                continue
            if not all([await self._bind(port) for port in ports.values()]):
                continue
            self.pairs[pair_id] = pairs.Pair(allocation)
            for side, port in ports.items():
                self.owners[port] = (pair_id, side)
            log.info(
                "pair %s: buyer port %s, provider port %s",
                pair_id,
                allocation.buyer_port,
                allocation.provider_port,
            )
            # What reached the pair's ports before the pair did, as if it arrived now.
            for port in ports.values():
                early = self.early.pop(port, None)
                if early is not None and time.monotonic() - early[2] <= pairs.PENDING_SECONDS:
                    self.on_datagram(port, early[0], early[1])
        self.sync_fast_path()

    def _close(self, pair_id: str) -> None:
        pair = self.pairs.pop(pair_id, None)
        if pair is not None:
            for side in (pairs.BUYER, pairs.PROVIDER):
                self.owners.pop(pair.allocation.port(side), None)
        if self.routes.pop(pair_id, None) is not None:
            self._ruleset_dirty = True
        log.info("pair %s closed", pair_id)

    # -- forwarding --------------------------------------------------------------------
    def on_datagram(self, port: int, data: bytes, source: pairs.Address) -> None:
        owner = self.owners.get(port)
        if owner is None:
            # No pair on this port yet (or any more): keep the latest initiation, a side's
            # first packet, for a pair that arrives within PENDING_SECONDS. One per port, so a
            # flood costs no more than the range's size in memory.
            message = wgmsg.parse(data)
            if message is not None and message.type == wgmsg.INITIATION:
                self.early[port] = (data, source, time.monotonic())
            return
        pair_id, side = owner
        pair = self.pairs[pair_id]
        if data[:1] == b"\x01" and pair.foreign_initiation(side, data):
            # Made for the pair the gateway gave this port to next (this one ends at the next
            # poll): kept for it, as for a port with no pair. The pair here drops it below.
            self.early[port] = (data, source, time.monotonic())
        route = self.routes.get(pair_id)
        if route is not None and data[:1] in (b"\x01", b"\x02"):
            known = route.buyer if side == pairs.BUYER else route.provider
            if source != known:
                # A handshake from a new address while the kernel forwards the old one: back to
                # Python until it completes (pairs.py), or the kernel would carry the other
                # side's answer to the old address, past the relay's eyes.
                del self.routes[pair_id]
                pair.handshaken = False
                self._ruleset_dirty = True
                self.sync_fast_path()
        destination, changed = pair.receive(side, source, data, time.monotonic())
        if changed and pair_id in self.routes:
            # A side moved (a handshake, or its data from a new address): the kernel follows
            # below, in a new zone.
            del self.routes[pair_id]
            self._ruleset_dirty = True
        if destination is not None:
            out = self.sockets.get(pair.allocation.port(pair.other(side)))
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

    async def kernel_bytes(self) -> dict[int, int]:
        """Bytes the kernel forwarded per zone, read by `nft` in a thread: a subprocess on the
        event loop would hold up every packet Python forwards while it runs, each poll."""
        if not (self.fast_path and self.routes):
            return {}
        return await asyncio.get_running_loop().run_in_executor(None, fastpath.forwarded_bytes)

    def status(self, kernel: dict[int, int]) -> dict:
        """The relay's pairs and load; `kernel` from kernel_bytes()."""
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
        for transport in self.sockets.values():
            transport.close()
        self.sockets.clear()
        if self.fast_path:
            fastpath.remove()


def _raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


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
    opened = await relay.open_ports()
    log.info("listening on %s of ports %s-%s", opened, low, high)
    while not stop.is_set():
        try:
            if args.allocations:
                mtime = os.stat(args.allocations).st_mtime_ns
                if mtime != last_mtime:
                    last_mtime = mtime
                    await relay.load(parse_allocations(Path(args.allocations).read_bytes()))
            else:
                status = relay.status(await relay.kernel_bytes())
                allocations = await loop.run_in_executor(
                    None, fetch_control, args.control, token, status
                )
                await relay.load(allocations)
        except (OSError, ValueError, KeyError) as exc:
            # The gateway away or a bad file: keep serving the pairs we have.
            log.warning("allocations not refreshed: %s", exc)
        if args.status:
            tmp = Path(args.status + ".tmp")
            tmp.write_text(json.dumps(relay.status(await relay.kernel_bytes())))
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
