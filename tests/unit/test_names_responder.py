"""The node's DNS responder (clawnode.names): who resolves what, what a stranger learns, and that
no packet crashes it. The answers are checked with dnspython's own parser, and the server over
real loopback sockets (UDP and TCP)."""

from __future__ import annotations

import asyncio
import random
import socket

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from clawnode import names, wire
from clawnode.firewall import SandboxRule, render_ruleset
from clawnode.keys import Identity

from tests.ports import unused_port

pytestmark = [pytest.mark.unit]

BUYER_A, BOX_A0, BOX_A1 = "10.64.0.1", "10.128.0.33", "10.128.0.65"
BUYER_B, BOX_B0 = "10.64.0.2", "10.128.0.34"
ORDER_A = wire.NameGroup(
    ref="order:17",
    clients=(BUYER_A, BOX_A0, BOX_A1),
    records=(
        wire.NameRecord(name="order-17-0.molt", address=BOX_A0),
        wire.NameRecord(name="order-17-1.molt", address=BOX_A1),
    ),
)
ORDER_B = wire.NameGroup(
    ref="order:18",
    clients=(BUYER_B, BOX_B0),
    records=(wire.NameRecord(name="order-18-0.molt", address=BOX_B0),),
)
OPERATORS = wire.NameGroup(
    ref="operators",
    clients=("10.100.0.1",),
    records=(wire.NameRecord(name="node-47.mesh", address="10.100.128.47"),),
)
INDEX = names.index_of([ORDER_A, ORDER_B, OPERATORS], recursive=[BUYER_A])


def ask(source: str, name: str, rdtype: str = "A", index=INDEX, *, qid: int = 4242):
    query = dns.message.make_query(name, rdtype)
    query.id = qid
    reply, forward = names.answer(index, source, query.to_wire())
    return (dns.message.from_wire(reply) if reply is not None else None), forward, reply


def addresses(message: dns.message.Message) -> list[str]:
    return [item.address for rrset in message.answer for item in rrset]


def test_a_member_resolves_every_sandbox_of_its_order():
    for source in (BUYER_A, BOX_A0, BOX_A1):
        reply, forward, _ = ask(source, "order-17-1.molt")
        assert not forward
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.flags & dns.flags.AA
        assert addresses(reply) == [BOX_A1]
        assert reply.answer[0].ttl == names.TTL


def test_names_are_matched_without_regard_to_case_and_the_question_is_echoed():
    reply, _, _ = ask(BOX_A0, "ORDER-17-0.Molt")
    assert addresses(reply) == [BOX_A0]
    assert reply.question[0].name.to_text() == "ORDER-17-0.Molt."


def test_another_orders_name_gets_the_very_bytes_of_a_name_that_does_not_exist():
    _, _, foreign = ask(BUYER_A, "order-18-0.molt")
    # The same question where order 18 does not exist at all
    without_b = names.index_of([ORDER_A], recursive=[BUYER_A])
    _, _, missing = ask(BUYER_A, "order-18-0.molt", index=without_b)
    assert foreign == missing
    assert dns.message.from_wire(foreign).rcode() == dns.rcode.NXDOMAIN
    assert not dns.message.from_wire(foreign).answer
    # and the same shape as a name nobody has
    reply, _, _ = ask(BUYER_A, "order-99-0.molt")
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer and not reply.authority


def test_an_order_cannot_see_operator_names_nor_operators_order_names():
    assert ask(BOX_A0, "node-47.mesh")[0].rcode() == dns.rcode.NXDOMAIN
    assert ask("10.100.0.1", "node-47.mesh")[0].answer
    assert ask("10.100.0.1", "order-17-0.molt")[0].rcode() == dns.rcode.NXDOMAIN


def test_an_unknown_source_is_refused_whatever_it_asks():
    for name in ("order-17-0.molt", "nothing.molt", "example.com"):
        reply, forward, _ = ask("10.64.0.77", name)
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer and not forward


def test_other_types_of_an_own_name_are_no_data_not_nxdomain():
    reply, _, _ = ask(BOX_A0, "order-17-0.molt", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer


def test_names_outside_the_zones_are_forwarded_only_for_recursive_clients():
    assert ask(BUYER_A, "example.com")[1] is True
    reply, forward, _ = ask(BOX_A0, "example.com")  # a sandbox without egress
    assert not forward and reply.rcode() == dns.rcode.REFUSED


def test_the_zone_apex_itself_is_not_forwarded():
    reply, forward, _ = ask(BUYER_A, "molt")
    assert not forward and reply.rcode() == dns.rcode.NXDOMAIN


def test_malformed_packets_get_formerr_with_their_id_or_nothing():
    assert names.answer(INDEX, BUYER_A, b"") == (None, False)
    assert names.answer(INDEX, BUYER_A, b"\x12\x34\x01") == (None, False)
    reply, forward = names.answer(INDEX, BUYER_A, b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 30)
    message = dns.message.from_wire(reply)
    assert message.id == 0x1234 and message.rcode() == dns.rcode.FORMERR and not forward
    # a response is never answered (two responders would bounce it forever)
    query = dns.message.make_query("order-17-0.molt", "A")
    response = dns.message.make_response(query).to_wire()
    assert names.answer(INDEX, BUYER_A, response) == (None, False)
    assert names.answer(INDEX, BUYER_A, b"\x12\x34\x81\x00" + b"\x00" * 30) == (None, False)


def test_two_questions_are_formerr_and_other_opcodes_not_implemented():
    query = dns.message.make_query("order-17-0.molt", "A")
    query.question.append(dns.message.make_query("order-17-1.molt", "A").question[0])
    reply = dns.message.from_wire(names.answer(INDEX, BOX_A0, query.to_wire())[0])
    assert reply.rcode() == dns.rcode.FORMERR and not reply.answer
    notify = dns.message.make_query("order-17-0.molt", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    reply = dns.message.from_wire(names.answer(INDEX, BOX_A0, notify.to_wire())[0])
    assert reply.rcode() == dns.rcode.NOTIMP


def test_random_and_mangled_packets_never_raise():
    rng = random.Random(16)
    good = dns.message.make_query("order-17-0.molt", "A").to_wire()
    for _ in range(3000):
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        else:
            data = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randrange(len(data) + 1)])
        reply, _ = names.answer(INDEX, BUYER_A, data)
        assert reply is None or len(reply) <= names.MAX_UDP


def test_answers_fit_a_plain_udp_packet_even_for_the_longest_name():
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 56]) + ".molt"
    assert len(longest) == 253
    group = wire.NameGroup(
        ref="order:1", clients=(BUYER_A,), records=(wire.NameRecord(name=longest, address=BOX_A0),)
    )
    index = names.index_of([group])
    reply, _, raw = ask(BUYER_A, longest, index=index)
    assert addresses(reply) == [BOX_A0]
    assert len(raw) <= names.MAX_UDP
    # no amplification for a stranger: the refusal is the size of the query
    query = dns.message.make_query(longest, "A").to_wire()
    refused, _ = names.answer(index, "10.9.9.9", query)
    assert len(refused) == len(query)


def test_the_names_table_refuses_what_the_responder_could_not_serve():
    good = {"name": "order-17-0.molt", "address": BOX_A0}
    assert wire.NameRecord.from_dict(good).name == "order-17-0.molt"
    for name in ("Order-17-0.molt", "order-17-0.com", "-x.molt", "x..molt", "molt", "a b.molt"):
        with pytest.raises(wire.ProtocolError):
            wire.NameRecord.from_dict({**good, "name": name})
    for address in ("10.128.0.033", "10.128.0.33/32", "::1", ""):
        with pytest.raises(wire.ProtocolError):
            wire.NameRecord.from_dict({**good, "address": address})
    with pytest.raises(wire.ProtocolError, match="given twice"):
        wire.NameGroup.from_dict({"ref": "order:1", "clients": [], "records": [good, good]})
    with pytest.raises(wire.ProtocolError, match="duplicates"):
        wire.NameGroup.from_dict({"ref": "order:1", "clients": [BUYER_A, BUYER_A], "records": []})


def _table(node_id: str, revision: int, groups=(ORDER_A,)) -> dict:
    return wire.NameTable(
        node_id=node_id, revision=revision, groups=tuple(groups), issued_at=1
    ).to_dict()


def test_only_the_pinned_gateways_table_for_this_node_is_taken():
    gateway, other = Identity.generate(), Identity.generate()
    node_id = Identity.generate().node_id
    desired = wire.DesiredState(node_id=node_id, revision=3, peers=(), issued_at=1)
    responder = names.NamesResponder([], upstreams=())
    signed = wire.signed_envelope(wire.NAMES, _table(node_id, 3), gateway)
    key = gateway.public_key
    apply = names.apply_envelope
    assert apply(responder, signed, gateway_key=key, node_id=node_id, desired=desired) == ""
    assert responder.index[BOX_A0].names["order-17-1.molt"] == BOX_A1
    forged = wire.signed_envelope(wire.NAMES, _table(node_id, 4, ()), other)
    assert "refused" in apply(responder, forged, gateway_key=key, node_id=node_id, desired=None)
    elsewhere = wire.signed_envelope(wire.NAMES, _table(other.node_id, 4, ()), gateway)
    assert "another node" in apply(
        responder, elsewhere, gateway_key=key, node_id=node_id, desired=None
    )
    as_state = wire.signed_envelope(wire.DESIRED_STATE, _table(node_id, 4, ()), gateway)
    assert "refused" in apply(responder, as_state, gateway_key=key, node_id=node_id, desired=None)
    assert "refused" in apply(responder, None, gateway_key=key, node_id=node_id, desired=None)
    # an older table that arrives late changes nothing
    older = wire.signed_envelope(wire.NAMES, _table(node_id, 2, ()), gateway)
    assert apply(responder, older, gateway_key=key, node_id=node_id, desired=None) == ""
    assert BOX_A0 in responder.index and responder.revision == 3


def test_buyers_and_sandboxes_with_egress_are_the_recursive_clients():
    gateway = Identity.generate()
    node_id = Identity.generate().node_id
    box = dict(
        image="img:1", gpus=(), cpus=1000, memory_mb=64, disk_gb=1, pids_limit=64, ssh_keys=()
    )
    desired = wire.DesiredState(
        node_id=node_id,
        revision=1,
        peers=(),
        issued_at=1,
        sandboxes=(
            wire.SandboxSpec(
                ref="order:17", address=f"{BOX_A0}/32", peer_address=f"{BUYER_A}/32",
                egress=False, **box,
            ),
            wire.SandboxSpec(
                ref="order:18", address=f"{BOX_B0}/32", peer_address=f"{BUYER_B}/32",
                egress=True, **box,
            ),
        ),
    )  # fmt: skip
    responder = names.NamesResponder([], upstreams=())
    signed = wire.signed_envelope(wire.NAMES, _table(node_id, 1, (ORDER_A, ORDER_B)), gateway)
    names.apply_envelope(
        responder, signed, gateway_key=gateway.public_key, node_id=node_id, desired=desired
    )
    recursive = {source for source, client in responder.index.items() if client.recursive}
    assert recursive == {BUYER_A, BUYER_B, BOX_B0}


def test_the_firewall_opens_port_53_only_with_names_and_only_to_the_responder():
    rules = [SandboxRule("msbx0123456789a", f"{BOX_A0}/32", f"{BUYER_A}/32", False)]
    without = render_ruleset("molt0", "10.100.128.5", rules)
    assert "dport 53" not in without
    script = render_ruleset("molt0", "10.100.128.5", rules, names=True)
    lines = [line.strip() for line in script.splitlines()]
    sandbox_dns = (
        'iifname "msbx*" iifname . ip saddr @owned ip daddr 169.254.0.1 '
        "meta l4proto { tcp, udp } th dport 53 accept"
    )
    peer_dns = (
        'iifname "molt0" ip saddr @sandboxed ip daddr 10.100.128.5 '
        "meta l4proto { tcp, udp } th dport 53 accept"
    )
    # before the drops they are exceptions to
    assert lines.index(sandbox_dns) < lines.index('iifname "msbx*" counter drop')
    assert lines.index(peer_dns) < lines.index('iifname "molt0" ip saddr @sandboxed counter drop')


def _free_port() -> int:
    return unused_port(socket.SOCK_DGRAM)


async def _serve(index, *, upstreams=()):
    responder = names.NamesResponder(["127.0.0.1"], port=_free_port(), upstreams=upstreams)
    responder.update(index, 1)
    await responder.start()
    return responder


def test_the_server_answers_over_udp_and_tcp_and_survives_garbage():
    index = names.index_of(
        [wire.NameGroup(ref="t", clients=("127.0.0.1",), records=ORDER_A.records)]
    )

    async def scenario():
        responder = await _serve(index)
        try:
            port = responder.port
            query = dns.message.make_query("order-17-0.molt", "A")
            loop = asyncio.get_running_loop()
            # garbage first, over UDP and TCP: the server must go on answering
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.sendto(b"\x00", ("127.0.0.1", port))
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00\x05abc")
            writer.close()
            udp = await loop.run_in_executor(
                None, lambda: dns.query.udp(query, "127.0.0.1", port=port, timeout=5)
            )
            tcp = await loop.run_in_executor(
                None, lambda: dns.query.tcp(query, "127.0.0.1", port=port, timeout=5)
            )
            return udp, tcp
        finally:
            await responder.stop()

    udp, tcp = asyncio.run(scenario())
    assert addresses(udp) == [BOX_A0] and addresses(tcp) == [BOX_A0]


class _FakeUpstream(asyncio.DatagramProtocol):
    """The node's own resolver, as a stand-in: every A question gets 192.0.2.80."""

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        reply.answer.append(
            dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.80")
        )
        self.transport.sendto(reply.to_wire(), addr)


def test_forwarded_queries_come_back_from_the_upstream_and_fail_as_servfail_without_one(
    monkeypatch,
):
    async def scenario():
        loop = asyncio.get_running_loop()
        port = _free_port()
        # The forwarder asks upstreams on port 53, which a test cannot bind: move it.
        monkeypatch.setattr(names, "PORT", port)
        upstream, _ = await loop.create_datagram_endpoint(
            _FakeUpstream, local_addr=("127.0.0.2", port)
        )
        recursive = names.index_of(
            [wire.NameGroup(ref="t", clients=("127.0.0.1",), records=())], ["127.0.0.1"]
        )
        front = await _serve(recursive, upstreams=["127.0.0.2"])
        try:
            query = dns.message.make_query("www.example.com", "A")
            forwarded = await loop.run_in_executor(
                None, lambda: dns.query.udp(query, "127.0.0.1", port=front.port, timeout=5)
            )
            over_tcp = await loop.run_in_executor(
                None, lambda: dns.query.tcp(query, "127.0.0.1", port=front.port, timeout=5)
            )
            front.upstreams = ()
            failed = await loop.run_in_executor(
                None, lambda: dns.query.udp(query, "127.0.0.1", port=front.port, timeout=5)
            )
            return forwarded, over_tcp, failed
        finally:
            await front.stop()
            upstream.close()

    forwarded, over_tcp, failed = asyncio.run(scenario())
    assert addresses(forwarded) == ["192.0.2.80"] and addresses(over_tcp) == ["192.0.2.80"]
    assert failed.rcode() == dns.rcode.SERVFAIL and not failed.answer
