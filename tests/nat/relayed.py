"""The relay in the NAT lab: `python -m meshnet.relay` in a namespace of its own on the
services network (192.0.2.30), a capture of every packet on its link, and the bytes mover.

The relay is given its pairs through a file (`--allocations`), as an operator without a gateway
would; the gateway's control API serves the same JSON (tests/db/test_relays.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.nat import lab as nat_lab

REPO = Path(__file__).resolve().parents[2]
HELPERS = str(Path(__file__).with_name("relay_helpers.py"))
RELAY_ADDRESS = f"{nat_lab.SERVICES_NET}.30"
PORTS = (40000, 40999)
MARKER = b"MOLT-PLAINTEXT-MARKER-"


@dataclass
class LabRelay:
    lab: nat_lab.Lab
    ns: str
    workdir: Path
    process: subprocess.Popen
    capture: subprocess.Popen | None
    pairs: list[dict] = field(default_factory=list)
    _next_port: int = PORTS[0]

    @property
    def allocations(self) -> Path:
        return self.workdir / "pairs.json"

    @property
    def status_path(self) -> Path:
        return self.workdir / "status.json"

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"pairs": []}

    def pair_status(self, pair_id: str) -> dict | None:
        for entry in self.status()["pairs"]:
            if entry["id"] == pair_id:
                return entry
        return None

    def allocate(self, pair_id: str, buyer_key: str, provider_key: str) -> tuple[int, int]:
        """Give the relay a new pair; returns (buyer_port, provider_port) once it is bound."""
        ports = (self._next_port, self._next_port + 1)
        self._next_port += 2
        self.pairs.append(
            {
                "id": pair_id,
                "buyer_port": ports[0],
                "provider_port": ports[1],
                "buyer_key": buyer_key,
                "provider_key": provider_key,
            }
        )
        self._write()
        deadline = time.monotonic() + 10
        while self.pair_status(pair_id) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the relay never served pair {pair_id}")
            time.sleep(0.05)
        return ports

    def release(self, pair_id: str) -> None:
        self.pairs = [pair for pair in self.pairs if pair["id"] != pair_id]
        self._write()

    def _write(self) -> None:
        tmp = self.allocations.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pairs": self.pairs}))
        tmp.replace(self.allocations)

    def stop_capture(self) -> dict:
        """Stop the capture; what it saw on the relay's link."""
        assert self.capture is not None
        os.kill(self.capture.pid, signal.SIGTERM)
        out, _ = self.capture.communicate(timeout=30)
        self.capture = None
        return json.loads(out)


@contextlib.contextmanager
def relay(
    lab: nat_lab.Lab,
    workdir: Path,
    *,
    fast_path: bool = True,
    capture: bool = False,
    control: tuple[str, str] | None = None,
):
    """The relay process (and optionally the capture) in a namespace of its own. `control`
    (the gateway's relay control URL, the relay's token) has it ask the gateway for its pairs,
    as a deployment's relay does, instead of the pairs file."""
    ns = lab.namespace("relay")
    # Not a site: a cell's lab.release_sites() must leave the relay running for the next cell.
    lab.namespaces.remove(ns)
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "relay.log", "w")  # noqa: SIM115  (the child holds it)
    process = None
    try:
        before = _links(lab, lab.internet)
        lab._uplink(ns, nat_lab.SERVICES_NET, addresses=(RELAY_ADDRESS,))
        # An earlier relay of this lab had the same address on another link: the internet's
        # router would send to its MAC until the neighbour entry expires (up to 45 s).
        lab.exec(lab.internet, "ip", "neigh", "flush", "to", RELAY_ADDRESS, check=False)
        if capture:
            # wireguard-go sends with UDP GSO: one frame on a veth can hold many datagrams. One
            # segment per frame on the relay's link, both ways (the internet's port toward the
            # relay, the relay's own), so the capture sees each datagram as a real NIC would.
            (port,) = _links(lab, lab.internet) - before
            lab.exec(lab.internet, "ip", "link", "set", port, "gso_max_segs", "1")
            lab.exec(ns, "ip", "link", "set", "wan", "gso_max_segs", "1")
        lab.exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        (workdir / "pairs.json").write_text(json.dumps({"pairs": []}))
        catcher = None
        if capture:
            catcher = lab.popen(
                ns,
                [sys.executable, HELPERS, "capture", "wan", f"{PORTS[0]}-{PORTS[1]}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert catcher.stdout is not None
            if catcher.stdout.readline().strip() != "ready":
                raise RuntimeError("the capture did not start")
        if control is None:
            source = ["--allocations", str(workdir / "pairs.json")]
        else:
            (workdir / "token").write_text(control[1])
            source = ["--control", control[0], "--token-file", str(workdir / "token")]
        args = [
            sys.executable, "-m", "meshnet.relay", "--address", RELAY_ADDRESS,
            "--ports", f"{PORTS[0]}-{PORTS[1]}", *source,
            "--status", str(workdir / "status.json"),
            "--poll", "0.1" if control is None else os.environ.get("MOLT_LAB_RELAY_POLL", "1"),
            *([] if fast_path else ["--no-fast-path"]),
        ]  # fmt: skip
        process = lab.popen(ns, args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        the_relay = LabRelay(lab, ns, workdir, process, catcher)
        deadline = time.monotonic() + 15
        while not the_relay.status_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (workdir / "relay.log").read_text()
                raise RuntimeError(f"the relay did not start: {log_text}")
            time.sleep(0.05)
        yield the_relay
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        log.close()
        lab.release([ns])


def _links(lab: nat_lab.Lab, ns: str) -> set[str]:
    out = lab.exec(ns, "ip", "-o", "link", "show").stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def move_bytes(lab: nat_lab.Lab, sender_ns: str, receiver_ns: str, to: str, size: int) -> dict:
    """`size` bytes of the marker pattern over TCP from `sender_ns` to `to` (a tunnel address
    in `receiver_ns`); the receiver's count and the transfer's wall time."""
    sink = lab.popen(
        receiver_ns, [sys.executable, HELPERS, "sink", to, "5201"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the sink did not start")
        sent = lab.exec(
            sender_ns, sys.executable, HELPERS, "source", to, "5201", str(size), timeout=120
        )
        out, _ = sink.communicate(timeout=60)
        return {**json.loads(out), **json.loads(sent.stdout)}
    finally:
        if sink.poll() is None:
            sink.kill()


def memory_holds(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which of `needles` occur anywhere in process `pid`'s readable memory."""
    found: set[bytes] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if "r" not in parts[1]:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            found.update(needle for needle in needles if needle in chunk)
    return sorted(found)


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
