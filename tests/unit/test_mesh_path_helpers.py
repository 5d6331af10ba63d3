"""benchmarks/mesh_path.py's measuring helpers, on a tiny scale: the figures it reports are only
as good as these (the TCP transfer over loopback, ping's output parsed, the all-reduce ranks'
results combined and checked)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def mesh_path():
    sys.path.insert(0, str(BENCHMARKS))  # it imports its sibling time_to_tunnel.py
    try:
        spec = importlib.util.spec_from_file_location("mesh_path", BENCHMARKS / "mesh_path.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_a_tcp_transfer_over_loopback_counts_every_byte(mesh_path):
    size = (1 << 20) + 12345  # not a whole number of the sender's chunks
    moved = mesh_path.tcp_transfer([], [], "127.0.0.1", size, port=_free_port())
    assert moved["received"] == size and moved["sent"] == size
    assert moved["seconds"] > 0
    assert moved["MBps"] == pytest.approx(size / moved["seconds"] / 1e6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PING = """PING 10.254.44.2 (10.254.44.2) 56(84) bytes of data.
64 bytes from 10.254.44.2: icmp_seq=1 ttl=64 time=0.061 ms
64 bytes from 10.254.44.2: icmp_seq=2 ttl=64 time=0.250 ms
64 bytes from 10.254.44.2: icmp_seq=2 ttl=64 time=0.300 ms (DUP!)
64 bytes from 10.254.44.2: icmp_seq=4 ttl=64 time=1.5 ms

--- 10.254.44.2 ping statistics ---
4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 31ms
rtt min/avg/max/mdev = 0.061/0.527/1.500/0.561 ms
"""


def test_ping_output_gives_each_reply_once_in_order(mesh_path):
    assert mesh_path.parse_ping(PING) == ([0.061, 0.25, 1.5], 1)


def test_summary_takes_nearest_rank_percentiles(mesh_path):
    values = [float(x) for x in range(1, 101)]  # 1..100
    got = mesh_path.summary(list(reversed(values)))
    assert got == {"n": 100, "p50": 51.0, "p95": 95.0, "min": 1.0, "max": 100.0, "mean": 50.5}
    assert mesh_path.summary([]) == {"n": 0}


def _rank(seconds: dict[str, list[float]], ok: bool = True) -> str:
    body = {mib: {"seconds": s, "sum_ok": ok} for mib, s in seconds.items()}
    return "gloo noise\nRESULT " + json.dumps(body) + "\n"


def test_all_reduce_samples_take_the_slower_rank_per_rep(mesh_path):
    outputs = [
        _rank({"4": [0.1, 0.5], "64": [2.0, 1.0]}),
        _rank({"4": [0.2, 0.4], "64": [1.5, 1.2]}),
    ]
    assert mesh_path.all_reduce_samples(outputs, [4, 64]) == {4: [0.2, 0.5], 64: [2.0, 1.2]}


def test_all_reduce_samples_refuse_a_wrong_sum_or_a_silent_rank(mesh_path):
    with pytest.raises(RuntimeError, match="wrong sum"):
        mesh_path.all_reduce_samples([_rank({"4": [0.1]}), _rank({"4": [0.1]}, ok=False)], [4])
    with pytest.raises(RuntimeError, match="rank 1 printed no result"):
        mesh_path.all_reduce_samples([_rank({"4": [0.1]}), "Traceback ...\n"], [4])


def test_the_scripts_run_in_the_sandboxes_compile(mesh_path):
    compile(mesh_path.ALL_REDUCE, "all_reduce", "exec")
    compile(mesh_path.TCP_HELPER, "tcp_helper", "exec")


BUSY = """
import sys, time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("busy", flush=True)
time.sleep(60)
"""


def test_cpu_seconds_finds_the_processes_by_their_argv_and_sums_their_cpu(mesh_path, tmp_path):
    word = f"mesh-path-probe-{os.getpid()}"
    busy = [
        subprocess.Popen([sys.executable, "-c", BUSY, word], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for proc in busy:
            assert proc.stdout.readline() == "busy\n"
        count, seconds = mesh_path.cpu_seconds({Path(sys.executable).name, word})
        assert count == 2
        assert 0.55 <= seconds < 5  # 0.3 s each of CPU, counted in clock ticks
        assert mesh_path.cpu_seconds({word, "no-such-word"}) == (0, 0.0)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
