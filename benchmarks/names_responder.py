"""What the names responder (clawnode.names) costs per query, against a baseline in the same run.

    .venv/bin/python benchmarks/names_responder.py [--queries 20000] [--orders 1000]

Two measurements, each with its baseline:
- ``answer``: the pure decision (parse, look up, build, encode) for a member's A query, a
  stranger's query and another order's name, in a table of ``--orders`` orders; baseline:
  dnspython parsing the same query and encoding a bare response (what any dnspython server
  pays), so the ratio is our own work on top;
- ``udp``: round trips through the real asyncio server on loopback, one at a time from a
  blocking client; baseline: the same client against a bare asyncio UDP echo on loopback.

Prints one JSON object: per case p50/p90/p99 in microseconds and the ratio to its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

import dns.message
from clawnode import names, wire


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50_us": round(pick(0.50) * 1e6, 2),
        "p90_us": round(pick(0.90) * 1e6, 2),
        "p99_us": round(pick(0.99) * 1e6, 2),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 2),
    }


def table(orders: int) -> names.NameIndex:
    groups = []
    for i in range(orders):
        box, buyer = f"10.128.{i // 250}.{i % 250 + 1}", f"10.64.{i // 250}.{i % 250 + 1}"
        groups.append(
            wire.NameGroup(
                ref=f"order:{i}",
                clients=(box, buyer),
                records=(wire.NameRecord(name=f"order-{i}-0.molt", address=box),),
            )
        )
    groups.append(
        wire.NameGroup(
            ref="bench",
            clients=("127.0.0.1",),
            records=(wire.NameRecord(name="order-0-0.molt", address="10.128.0.1"),),
        )
    )
    return names.index_of(groups)


def time_each(fn, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_answer(index: names.NameIndex, count: int) -> dict[str, object]:
    member = dns.message.make_query("order-7-0.molt", "A").to_wire()
    foreign = dns.message.make_query("order-8-0.molt", "A").to_wire()

    def baseline() -> None:
        query = dns.message.from_wire(member)
        dns.message.make_response(query).to_wire()

    base = percentiles(time_each(baseline, count))
    out: dict[str, object] = {"baseline_parse_and_encode": base}
    cases = {
        "member_a_record": ("10.64.0.8", member),
        "other_orders_name": ("10.64.0.8", foreign),
        "unknown_source": ("10.9.9.9", member),
    }
    for label, (source, data) in cases.items():
        got = percentiles(time_each(lambda s=source, d=data: names.answer(index, s, d), count))
        got["ratio_p50"] = round(got["p50_us"] / base["p50_us"], 2)
        out[label] = got
    return out


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


def bench_udp(index: names.NameIndex, count: int) -> dict[str, object]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    ports: dict[str, int] = {}

    async def serve() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        responder = names.NamesResponder(["127.0.0.1"], port=port, upstreams=())
        responder.update(index, 1)
        await responder.start()
        echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
        ports.update(responder=port, echo=echo.get_extra_info("sockname")[1])
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    ready.wait(10)
    query = dns.message.make_query("order-0-0.molt", "A").to_wire()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)

    def round_trip(port: int) -> None:
        client.sendto(query, ("127.0.0.1", port))
        client.recv(2048)

    base = percentiles(time_each(lambda: round_trip(ports["echo"]), count))
    got = percentiles(time_each(lambda: round_trip(ports["responder"]), count))
    got["ratio_p50"] = round(got["p50_us"] / base["p50_us"], 2)
    loop.call_soon_threadsafe(loop.stop)
    client.close()
    return {"baseline_udp_echo": base, "responder_member_query": got}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--orders", type=int, default=1000)
    args = parser.parse_args()
    index = table(args.orders)
    report = {
        "orders_in_table": args.orders,
        "queries_per_case": args.queries,
        "answer": bench_answer(index, args.queries),
        "udp": bench_udp(index, args.queries // 4),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
