"""The node's DNS responder: each sandbox's name (``order-17-0.molt``) for the members of its
order, ``node-<n>.mesh`` for operators, and nothing for anyone else.

Who may resolve what comes from the gateway's signed names table (clawnode.wire.names): for
each client address (a sandbox, a buyer's tunnel address, the hub) the names it may resolve.
A query is answered by its source address alone; the firewall (clawnode.firewall, ``names``)
lets only sandboxes (each from its own address on its own veth) and job peers (WireGuard's
cryptokey routing fixes their source) reach port 53, so a source cannot be borrowed.

What a client gets:
- a name of its own group: the A record (TTL 30 s); another type of that name: no data;
- any other name in .molt or .mesh (another order's, or one that does not exist): NXDOMAIN,
  byte for byte the same answer, so nothing tells a foreign name from a missing one;
- a name outside those zones: forwarded to the node's own resolvers for clients that may
  reach the internet anyway (buyers, sandboxes with egress), else REFUSED (a resolver then
  tries its next server; a sandbox without egress gets no covert channel out through DNS);
- an unknown source: REFUSED; a malformed query: FORMERR when it has a header, else nothing.

The server is asyncio UDP and TCP (RFC 7766 framing) on addresses bound with IP_FREEBIND, so
the sandboxes' gateway address (169.254.0.1) can be bound before the first sandbox veth exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rrset

from . import wire

__all__ = [
    "PORT",
    "TTL",
    "Client",
    "NameIndex",
    "NamesResponder",
    "answer",
    "index_of",
    "upstream_servers",
]

PORT = 53
TTL = 30  # seconds: a sandbox's address lives as long as its order
ZONES = tuple(f"{zone}." for zone in wire.names.NAME_ZONES)
MAX_UDP = 512  # without EDNS (RFC 1035); our answers are one record, far below it
MAX_TCP_CLIENTS = 64
TCP_IDLE_S = 10.0
FORWARD_TIMEOUT_S = 3.0
MAX_FORWARDS = 128  # queries waiting on the upstream at once
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


@dataclass(frozen=True)
class Client:
    """What one source address may resolve: its names (lower case, no trailing dot) and
    whether names outside our zones are forwarded for it."""

    names: Mapping[str, str] = field(default_factory=dict)
    recursive: bool = False


NameIndex = Mapping[str, Client]  # source address -> Client


def index_of(groups: Iterable[wire.NameGroup], recursive: Iterable[str] = ()) -> dict[str, Client]:
    """The responder's lookup table from the signed groups: every client of a group may resolve
    every record of it (a client in two groups, both). ``recursive``: the sources whose other
    names are forwarded (the agent names buyers and sandboxes with egress)."""
    names: dict[str, dict[str, str]] = {}
    for group in groups:
        records = {record.name: record.address for record in group.records}
        for client in group.clients:
            names.setdefault(client, {}).update(records)
    forward = set(recursive)
    return {
        source: Client(names=records, recursive=source in forward)
        for source, records in names.items()
    }


def _header_reply(data: bytes, rcode: int) -> bytes | None:
    """A bare reply (no question) to a query too broken to parse: its id, QR set, ``rcode``.
    None for fewer than 12 bytes or a packet that is itself a response (answering responses
    would let two responders bounce packets off each other forever)."""
    if len(data) < 12:
        return None
    (qid, flags) = struct.unpack("!HH", data[:4])
    if flags & dns.flags.QR:
        return None
    opcode = flags & 0x7800
    return struct.pack("!HHHHHH", qid, dns.flags.QR | opcode | (rcode & 0xF), 0, 0, 0, 0)


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    response.flags &= ~dns.flags.AA
    return response


def _wire(response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
    limit = 65535 if tcp else max(MAX_UDP, query.payload if query.edns >= 0 else 0)
    return response.to_wire(max_size=limit)


Decision = tuple[bytes | None, bool]  # (reply to send, or None; forward the query upstream?)


def answer(index: NameIndex, source: str, data: bytes, *, tcp: bool = False) -> Decision:
    """What to do with ``data`` from ``source`` (pure). Never raises on what a client sends."""
    try:
        query = dns.message.from_wire(data)
    except dns.exception.DNSException:
        return _header_reply(data, dns.rcode.FORMERR), False
    except Exception:  # dnspython's parser may raise others on hostile input; never crash
        return _header_reply(data, dns.rcode.FORMERR), False
    if query.flags & dns.flags.QR:
        return None, False
    if query.opcode() != dns.opcode.QUERY:
        return _wire(_reply(query, dns.rcode.NOTIMP), query, tcp), False
    if len(query.question) != 1:
        return _wire(_reply(query, dns.rcode.FORMERR), query, tcp), False
    client = index.get(source)
    if client is None:
        return _wire(_reply(query, dns.rcode.REFUSED), query, tcp), False
    question = query.question[0]
    qname = question.name.to_text().lower()
    if not qname.endswith(ZONES) and qname.rstrip(".") not in wire.names.NAME_ZONES:
        if client.recursive:
            return None, True
        return _wire(_reply(query, dns.rcode.REFUSED), query, tcp), False
    address = client.names.get(qname.rstrip("."))
    if address is None or question.rdclass != dns.rdataclass.IN:
        # Another order's name and a name nobody has get the same bytes (the id and the
        # question are the client's own).
        return _wire(_reply(query, dns.rcode.NXDOMAIN), query, tcp), False
    response = _reply(query, dns.rcode.NOERROR)
    response.flags |= dns.flags.AA
    if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        # Built from the address directly: rrset.from_text would run the zone-file tokenizer
        # for every answer (about half the cost of a whole query).
        record = dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, address)  # type: ignore[no-untyped-call]
        response.answer.append(dns.rrset.from_rdata(question.name, TTL, record))
    return _wire(response, query, tcp), False


def upstream_servers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """The node's own IPv4 resolvers, where out-of-zone queries of recursive clients go."""
    servers = []
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as resolv:
        for line in resolv:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                servers.append(parts[1])
    return tuple(servers)


def _socket(kind: int, address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The sandboxes' gateway address exists only while a sandbox veth does.
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, responder: NamesResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply, forward = answer(self.responder.index, addr[0], data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
        elif forward:
            self.responder.forward(data, lambda out: self._send(out, addr))

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)


class _Upstream(asyncio.DatagramProtocol):
    """One forwarded query: the first reply with its id from the upstream it was sent to."""

    def __init__(self, qid: bytes, done: asyncio.Future[bytes]) -> None:
        self.qid = qid
        self.done = done

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:2] == self.qid and not self.done.done():
            self.done.set_result(data)


class NamesResponder:
    """The responder on ``addresses`` (UDP and TCP port ``port``), answering from ``index``,
    which ``update`` replaces whole."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        port: int = PORT,
        upstreams: Sequence[str] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.addresses = tuple(addresses)
        self.port = port
        self.upstreams = tuple(upstreams) if upstreams is not None else upstream_servers()
        self.say = say
        self.index: NameIndex = {}
        self.revision = -1
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.AbstractServer] = []
        self._tcp_clients = 0
        self._forwards = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def update(self, index: NameIndex, revision: int) -> bool:
        """Take ``index`` unless it is of an older revision than the one held."""
        if revision < self.revision:
            return False
        self.index, self.revision = dict(index), revision
        return True

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for address in self.addresses:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), sock=_socket(socket.SOCK_DGRAM, address, self.port)
                )
                self._udp.append(transport)
                tcp = _socket(socket.SOCK_STREAM, address, self.port)
                self._tcp.append(await asyncio.start_server(self._tcp_client, sock=tcp))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        self._udp, self._tcp = [], []

    def forward(self, query: bytes, send: Callable[[bytes], None]) -> None:
        """Ask the node's first resolver on the client's behalf; its reply goes back as is."""
        if not self.upstreams or self._forwards >= MAX_FORWARDS:
            reply = _header_reply(query, dns.rcode.SERVFAIL)
            if reply is not None:
                send(reply)
            return
        self._forwards += 1  # counted here, so a burst cannot pass the cap before tasks run
        task = asyncio.ensure_future(self._forward(query, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, query: bytes, send: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        transport = None
        try:
            done: asyncio.Future[bytes] = loop.create_future()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Upstream(query[:2], done), remote_addr=(self.upstreams[0], PORT)
            )
            transport.sendto(query)
            send(await asyncio.wait_for(done, FORWARD_TIMEOUT_S))
        except (OSError, TimeoutError):
            reply = _header_reply(query, dns.rcode.SERVFAIL)
            if reply is not None:
                send(reply)
        finally:
            self._forwards -= 1
            if transport is not None:
                transport.close()

    async def _forwarded(self, query: bytes) -> bytes:
        replied: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def send(out: bytes) -> None:
            if not replied.done():
                replied.set_result(out)

        self.forward(query, send)
        return await asyncio.wait_for(replied, FORWARD_TIMEOUT_S + 1)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._tcp_clients >= MAX_TCP_CLIENTS or not peer:
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                (length,) = struct.unpack(
                    "!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                )
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_S)
                reply, forward = answer(self.index, peer[0], data, tcp=True)
                if forward:
                    reply = await self._forwarded(data)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()


def apply_envelope(
    responder: NamesResponder,
    envelope: object,
    *,
    gateway_key: bytes,
    node_id: str,
    desired: wire.DesiredState | None,
) -> str:
    """Verify the gateway's signed names table and hand it to ``responder``. The recursive
    clients are this node's buyers and its sandboxes with egress, from ``desired`` (the state
    applied with it). Returns "" or why it was refused (the responder keeps what it had)."""
    try:
        if not isinstance(envelope, dict):
            raise wire.BadSignature("names table is not a signed envelope")
        body = wire.open_envelope(envelope, gateway_key, wire.NAMES)
        table = wire.NameTable.from_dict(body)
        if table.node_id != node_id:
            raise wire.ProtocolError("names table is for another node")
    except (wire.BadSignature, wire.ProtocolError) as exc:
        return f"refused a names table: {exc}"
    recursive: list[str] = []
    for box in desired.sandboxes if desired is not None else ():
        recursive.append(box.peer_address.removesuffix("/32"))
        if box.egress:
            recursive.append(box.address.removesuffix("/32"))
    responder.update(index_of(table.groups, recursive), table.revision)
    return ""
