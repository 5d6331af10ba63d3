"""``clawnode``: join the mesh, show status, run the agent.

Exit codes: 0 ok; 1 an error, explained in one line on stderr (no traceback for anything a user
can cause: bad arguments, an unreachable or refusing gateway, unsafe state files); 2 usage errors
(argparse); 3 from `run` when the gateway refuses this node (revoked or unknown: join again).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import re
import socket
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import __version__, reconcile, wire
from .backends.base import PeerStatus
from .backends.choose import choose_backend
from .backends.errors import WireGuardError
from .backends.kernel import KernelBackend
from .backends.userspace import UAPI_SOCKET_DIR, UserspaceBackend
from .firewall import FirewallError
from .gateway_http import GatewayError, build_enroll_envelope, enroll, seen_address
from .gpu import (
    GpuReader,
    NvmlGpuReader,
    SimulatedGpuReader,
    SimulatedSpecError,
    parse_simulated_spec,
)
from .keys import IdentityFileError, InvalidKey
from .state import (
    BACKENDS,
    DEFAULT_JOB_NETWORK,
    DEFAULT_MESH_NETWORK,
    DEFAULT_STATE_DIR,
    AgentStatus,
    Enrollment,
    StateDir,
    StateError,
    check_transport,
    normalize_gateway_url,
    validate_interface_name,
)

TOKEN_ENV = "CLAWNODE_TOKEN"  # noqa: S105 (the variable's name, not a secret)
DEFAULT_INTERFACE = "molt0"
DEFAULT_LISTEN_PORT = 51820


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1."""


# Failures a user can cause or fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    CliError,
    StateError,
    GatewayError,
    WireGuardError,
    FirewallError,
    SimulatedSpecError,
    IdentityFileError,
    InvalidKey,
    wire.ProtocolError,
    OSError,
)


# -- arguments ------------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not between 1 and 65535")
    return value


SANDBOX_ENGINES = ("none", "podman", "docker")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")  # as wire.SandboxSpec.image


def _ulimit(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name.isalpha() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"--container-ulimit {text!r} must be NAME=N")
    return name, int(value)


def _docker_host(text: str) -> str:
    """--docker-host: a local unix socket only (the agent speaks HTTP to it, never TCP); ""
    (the default) means $DOCKER_HOST, else the standard socket."""
    if text and not text.startswith("unix:///"):
        raise argparse.ArgumentTypeError(f"{text!r} is not unix:///path/to/docker.sock")
    return text


def _image(text: str) -> str:
    if not _IMAGE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"--image {text!r} is not an image reference")
    return text


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where the identity and enrolment live (default {DEFAULT_STATE_DIR})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clawnode", description="MOLT provider agent: sell this machine's GPUs on the mesh."
    )
    parser.add_argument("--version", action="version", version=f"clawnode {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    join = commands.add_parser("join", help="enrol this machine with a gateway (safe to re-run)")
    join.add_argument(
        "--gateway", required=True, help="gateway base URL, e.g. https://molt.example"
    )
    join.add_argument(
        "--token",
        default=None,
        help=f"one-time enrolment token (or set {TOKEN_ENV}, which keeps it out of ps)",
    )
    _add_state_dir(join)
    join.add_argument(
        "--interface",
        default=DEFAULT_INTERFACE,
        help=f"WireGuard interface name (default {DEFAULT_INTERFACE})",
    )
    join.add_argument(
        "--listen-port",
        type=_port,
        default=DEFAULT_LISTEN_PORT,
        help=f"WireGuard UDP port (default {DEFAULT_LISTEN_PORT})",
    )
    join.add_argument("--backend", choices=BACKENDS, default="auto")
    join.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// to a gateway off this machine (a lab network you trust)",
    )
    join.add_argument(
        "--endpoint",
        default="",
        help="HOST:PORT buyers should send WireGuard packets to (default: this machine's address "
        "when the gateway sees it at one the machine holds, else what the gateway observes); "
        "'none': declare nothing (a public address that changes)",
    )
    join.add_argument(
        "--simulated-gpus",
        metavar="SPEC",
        default="",
        help='report GPUs that do not exist, marked simulated: "RTX 4090:2,A100 80GB:1"',
    )
    join.add_argument(
        "--region",
        default="",
        help="the region this machine is in (e.g. eu-west; the gateway lists its regions): "
        "its mesh address comes from that region's block and its listings carry it; fixed at "
        "the first join",
    )
    join.add_argument(
        "--force", action="store_true", help="enrol again even if this machine is enrolled"
    )
    join.set_defaults(func=cmd_join)

    status = commands.add_parser("status", help="identity, node, interface peers, connection")
    _add_state_dir(status)
    status.set_defaults(func=cmd_status)

    run = commands.add_parser("run", help="the agent daemon")
    _add_state_dir(run)
    run.add_argument("--simulated-gpus", metavar="SPEC", default="")
    run.add_argument(
        "--simulated-gpus-file",
        metavar="FILE",
        default="",
        help="report the GPUs listed in FILE (JSON, as enrolled), marked simulated: "
        "make run's demo nodes",
    )
    run.add_argument("--backend", choices=BACKENDS, default=None)
    run.add_argument(
        "--sandbox-engine",
        choices=SANDBOX_ENGINES,
        default="none",
        help="run each job in its own container (podman, or docker through its REST API); "
        "none: this node runs no sandboxes "
        "and reports every one asked for as failed (default none)",
    )
    run.add_argument(
        "--image",
        dest="images",
        action="append",
        type=_image,
        default=[],
        metavar="IMAGE",
        help="an image this node's sandboxes may run, offered to listings (repeat for more)",
    )
    # Podman's defaults suit a normal cgroup-v2 host (crun, systemd); older or unusual hosts
    # need these (design/network.md: runc, cgroupfs and lowered ulimits on cgroup v1).
    run.add_argument(
        "--docker-host",
        default="",
        type=_docker_host,
        metavar="unix:///PATH",
        help="the Docker engine's socket, with --sandbox-engine docker "
        "(default $DOCKER_HOST, else unix:///var/run/docker.sock)",
    )
    # Podman only: Docker's runtime and cgroup driver are its daemon's settings.
    run.add_argument("--container-runtime", default="", metavar="NAME", help="e.g. runc")
    run.add_argument("--cgroup-manager", default="", metavar="NAME", help="e.g. cgroupfs")
    run.add_argument(
        "--container-userns",
        default=None,
        metavar="MODE",
        help="podman's --userns for every sandbox (default auto:size=65536, which needs a "
        "'containers' entry in /etc/subuid and /etc/subgid); 'host' runs the buyer as the "
        "host's root (not recommended)",
    )
    run.add_argument(
        "--container-ulimit",
        dest="container_ulimits",
        action="append",
        type=_ulimit,
        default=[],
        metavar="NAME=N",
        help="a ulimit for every sandbox, e.g. nofile=20000 (repeat for more)",
    )
    run.add_argument(
        "--no-names",
        action="store_true",
        help="do not run the names responder (DNS for the sandboxes' names, port 53 on the "
        "mesh address and the sandboxes' gateway address; on by default with a sandbox engine)",
    )
    run.set_defaults(func=cmd_run)
    return parser


# -- output helpers -------------------------------------------------------------------------------


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # unreachable


def _age(seconds: int) -> str:
    if seconds < 0:
        seconds = 0
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


# -- join -----------------------------------------------------------------------------------------


# Addresses that are never a machine's public one: a node holding one of these and seen at it
# shares a private network with the gateway, and buyers elsewhere could not use it.
_NOT_PUBLIC = [
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]


def holds_address(address: str) -> bool:
    """Whether this machine has `address` on an interface: only then can a socket bind it."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def _endpoint_if_public(gateway: str, listen_port: int, out: TextIO) -> str:
    """The endpoint to declare when no --endpoint was given: this machine's own address and
    WireGuard port when the gateway sees it at an address the machine holds (nothing
    translates its packets, so buyers can send to it directly, and the gateway need not relay
    it as it relays a node behind a NAT); "" otherwise, and the gateway learns the node's
    mapping through its hub."""
    seen = seen_address(gateway)
    if seen is None:
        return ""
    address = ipaddress.ip_address(seen)
    if (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or any(address in net for net in _NOT_PUBLIC)
    ):
        return ""
    if not holds_address(seen):
        return ""  # not ours: a NAT (or a proxy) is in between
    host = f"[{seen}]" if address.version == 6 else seen
    endpoint = f"{host}:{listen_port}"
    _say(
        out,
        f"endpoint: {endpoint} (this machine holds the address the gateway sees it at: no NAT "
        "in between; --endpoint overrides)",
    )
    return endpoint


def cmd_join(args: argparse.Namespace, out: TextIO) -> int:
    try:
        gateway = normalize_gateway_url(args.gateway)
        check_transport(gateway, insecure=args.insecure)
        interface = validate_interface_name(args.interface)
    except StateError as exc:
        raise CliError(str(exc)) from None
    endpoint = args.endpoint.strip()
    # "none": the provider asks for no declaration at all, not even the address join would find
    # (a public address that changes: a declared one would go stale, an observed one follows).
    detect = endpoint.lower() != "none"
    if not detect:
        endpoint = ""
    if endpoint:
        try:
            wire.parse_endpoint(endpoint)
        except ValueError as exc:
            raise CliError(f"--endpoint: {exc}") from None
    spec = args.simulated_gpus.strip()
    if spec:
        parse_simulated_spec(spec)  # refuse a bad spec before anything is created
    state = StateDir(args.state_dir)

    existing = state.load_enrollment()
    if existing is not None and not args.force:
        return _already_enrolled(state, existing, gateway, args, out)

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    token = token.strip()
    if not token:
        raise CliError(f"no enrolment token: pass --token or set {TOKEN_ENV}")

    identity, created = state.load_or_create_identity()
    _say(
        out,
        f"identity: {'created' if created else 'loaded'} {identity.node_id} "
        f"({state.identity_path}, {_mode(state.identity_path)})",
    )
    reader: GpuReader = SimulatedGpuReader(spec, seed=identity.node_id) if spec else NvmlGpuReader()
    report = reader.read()
    _say(out, f"GPUs: {report.summary()}")

    if not endpoint and detect:
        endpoint = _endpoint_if_public(gateway, args.listen_port, out)
    _say(out, f"enrolling with {gateway}…")
    envelope = build_enroll_envelope(
        identity,
        token,
        hostname=socket.gethostname()[:253] or "localhost",
        listen_port=args.listen_port,
        endpoint=endpoint,
        gpus=report.gpus,
        region=args.region.strip(),
    )
    response = enroll(gateway, envelope, identity)
    try:
        enrollment = Enrollment(
            gateway=gateway,
            node_id=response.node_id,
            name=response.name,
            mesh_address=response.mesh_address,
            gateway_public_key=response.gateway_public_key,
            gateway_key_sequence=response.gateway_key_sequence,
            websocket_url=response.websocket_url,
            interface=interface,
            listen_port=args.listen_port,
            backend=args.backend,
            mesh_network=response.mesh_network or DEFAULT_MESH_NETWORK,
            job_network=response.job_network or DEFAULT_JOB_NETWORK,
            endpoint=endpoint,
            enrolled_at=int(time.time()),
            insecure=args.insecure,
        )
    except StateError as exc:
        raise CliError(f"the gateway's enrolment answer is not usable: {exc}") from None
    state.save_enrollment(enrollment)
    sequence = enrollment.gateway_key_sequence
    _say(
        out,
        f"gateway key pinned: {enrollment.gateway_public_key}"
        + (f" (certificate {sequence})" if sequence else ""),
    )
    _say(
        out,
        f"enrolment saved: {state.enrollment_path} ({_mode(state.enrollment_path)})",
    )
    region = f" (region {response.region})" if response.region else ""
    _say(out, f"{enrollment.name} joined the mesh at {enrollment.mesh_address}{region}")
    return 0


def _already_enrolled(
    state: StateDir, existing: Enrollment, gateway: str, args: argparse.Namespace, out: TextIO
) -> int:
    """Re-running join on an enrolled machine: report, change nothing, do not call the gateway."""
    identity = state.load_identity()
    if identity is None or identity.node_id != existing.node_id:
        have = identity.node_id if identity is not None else "missing"
        raise CliError(
            f"{state.enrollment_path} is for {existing.node_id} but the identity "
            f"({state.identity_path}) is {have}; run join --force to enrol this identity"
        )
    if existing.gateway != gateway:
        raise CliError(
            f"this machine is enrolled with {existing.gateway} as {existing.name}; "
            f"use --force to enrol with {gateway} instead"
        )
    _say(out, f"identity: loaded {identity.node_id} ({state.identity_path})")
    _say(
        out,
        f"already enrolled with {gateway} as {existing.name}; not contacting the gateway "
        "(use --force to enrol again)",
    )
    differs = [
        f"{flag} {current}"
        for flag, asked, current in (
            ("--interface", args.interface, existing.interface),
            ("--listen-port", args.listen_port, existing.listen_port),
            ("--backend", args.backend, existing.backend),
        )
        if asked != current
    ]
    if differs:
        _say(out, f"note: keeping the enrolled {', '.join(differs)} (use --force to change)")
    _say(out, f"{existing.name} joined the mesh at {existing.mesh_address}")
    return 0


# -- status ---------------------------------------------------------------------------------------


def _status_backend(enrollment: Enrollment) -> tuple[UserspaceBackend | KernelBackend, str]:
    # A wireguard-go socket for the interface says which backend the daemon used, whatever
    # auto would pick today.
    if (UAPI_SOCKET_DIR / f"{enrollment.interface}.sock").exists():
        return UserspaceBackend(enrollment.interface), "userspace (wireguard-go socket present)"
    cls, reason = choose_backend(enrollment.backend)
    return cls(enrollment.interface), reason


def _peer_line(peer: PeerStatus, now: int) -> str:
    handshake = (
        f"handshake {_age(now - peer.last_handshake)} ago"
        if peer.last_handshake
        else "no handshake"
    )
    line = (
        f"  peer {peer.public_key}  allowed {', '.join(peer.allowed_ips) or '-'}  "
        f"endpoint {peer.endpoint or '-'}  {handshake}  "
        f"rx {_human_bytes(peer.rx_bytes)}  tx {_human_bytes(peer.tx_bytes)}"
    )
    if reconcile.is_retired(peer):  # a removal's first step, until its final counters are read
        line += "  cut off, removal pending"
    return line


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _connection_line(status: AgentStatus | None, now: int) -> str:
    if status is None:
        return "gateway: not running"
    if not _pid_alive(status.pid):
        return (
            f"gateway: not running (last state {status.state}, {_age(now - status.updated_at)} ago)"
        )
    line = f"gateway: {status.state} for {_age(now - status.since)}"
    if status.revision:
        line += f", revision {status.revision} applied"
    if status.detail:
        line += f" ({status.detail})"
    return line


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    state = StateDir(args.state_dir)
    now = int(time.time())
    identity = state.load_identity()
    if identity is None:
        _say(out, f"identity: none yet ({state.identity_path}; clawnode join creates it)")
    else:
        _say(out, f"identity: {identity.node_id} ({state.identity_path})")
    enrollment = state.load_enrollment()
    if enrollment is None:
        _say(out, "node: not enrolled (clawnode join --gateway URL --token TOKEN)")
        return 1
    _say(
        out, f"node: {enrollment.name} at {enrollment.mesh_address} (gateway {enrollment.gateway})"
    )
    try:
        backend, reason = _status_backend(enrollment)
    except WireGuardError as exc:
        _say(out, f"backend: unavailable ({exc})")
        backend = None
    else:
        _say(out, f"backend: {reason}")
    if backend is not None:
        try:
            peers = backend.list_peers()
        except WireGuardError as exc:
            if exc.errno in (errno.ENODEV, errno.ECONNREFUSED):
                _say(
                    out,
                    f"interface: {enrollment.interface} is not up (clawnode run brings it up)",
                )
            else:
                _say(out, f"interface: {enrollment.interface} cannot be read ({exc})")
        else:
            _say(
                out,
                f"interface: {enrollment.interface} up, listen port {enrollment.listen_port}, "
                f"{len(peers)} peer{'s' if len(peers) != 1 else ''}",
            )
            for key in sorted(peers):
                _say(out, _peer_line(peers[key], now))
    _say(out, _connection_line(state.read_status(), now))
    return 0


# -- run ------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from .service import run_daemon

    if args.simulated_gpus and args.simulated_gpus_file:
        raise CliError("--simulated-gpus and --simulated-gpus-file: give one of them")
    if args.simulated_gpus:
        parse_simulated_spec(args.simulated_gpus)
    return run_daemon(
        str(args.state_dir),
        backend=args.backend,
        simulated_gpus=args.simulated_gpus,
        simulated_gpus_file=args.simulated_gpus_file,
        sandbox_engine=args.sandbox_engine,
        images=tuple(dict.fromkeys(args.images)),
        container_runtime=args.container_runtime,
        cgroup_manager=args.cgroup_manager,
        container_userns="" if args.container_userns == "host" else args.container_userns,
        container_ulimits=dict(args.container_ulimits),
        docker_host=args.docker_host,
        names=not args.no_names,
        say=lambda line: _say(out, line),
    )


# -- entry point ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, sys.stdout))
    except EXPECTED_ERRORS as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        print(f"clawnode: error: {message}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("clawnode: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
