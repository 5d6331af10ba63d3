"""The agent's state directory: identity, enrolment and the daemon's status.

Layout (default /var/lib/clawnode, ``--state-dir`` to change)::

    identity.key      Ed25519 seed, 0600 (keys.Identity)
    enrollment.json   what the gateway gave at enrolment, 0600, written atomically
    status.json       the daemon's gateway connection state, rewritten as it changes
    epochs.json       each peer's metering epoch and the next one to hand out (clawnode.journal)
    epochs.journal    epochs handed out since epochs.json was last written (clawnode.journal)

Every file but the journal is replaced atomically (temporary file in the same directory, fsync,
rename), so a crash or a power cut leaves either the old or the new file, never half of one.
The journal is only appended to, without fsync; its reader stops at a line cut short.

Pure stdlib + clawnode.keys; no Django.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .keys import Identity, InvalidKey, parse_ed25519_public_key

__all__ = [
    "BACKENDS",
    "CONNECTION_STATES",
    "DEFAULT_JOB_NETWORK",
    "DEFAULT_MESH_NETWORK",
    "DEFAULT_STATE_DIR",
    "AgentStatus",
    "Enrollment",
    "StateDir",
    "StateError",
    "check_transport",
    "normalize_gateway_url",
    "validate_interface_name",
]

DEFAULT_STATE_DIR = Path("/var/lib/clawnode")
IDENTITY_FILE = "identity.key"
ENROLLMENT_FILE = "enrollment.json"
STATUS_FILE = "status.json"
SANDBOX_RULES_FILE = "sandbox-rules.json"

BACKENDS = ("auto", "kernel", "userspace")
# The MOLT marketplace block of the IP plan (design/network.md): node and job addresses. The
# node's interface carries its address with this prefix, so every job address is on-link.
DEFAULT_MESH_NETWORK = "10.100.128.0/17"
# The whole mesh of the IP plan (the hub's control block, every region block, the MOLT block).
# Gateways now answer it as mesh_network; an enrolment saved with a narrower block (the MOLT
# /17 of gateways before regions) still routes it onto the interface (Enrollment.routes), so
# the node reaches the hub and nodes of every region.
WHOLE_MESH_NETWORK = "10.100.0.0/16"
# The job block of the IP plan (docs/ip-plan.md): buyers' job tunnel addresses. Not on-link with
# the node's address, so the agent routes it onto its WireGuard interface (a sandbox's replies
# reach the buyer's peer that way). An enrolment saved before the gateway named it loads with
# the plan's block, the one a gateway hands job addresses out of.
DEFAULT_JOB_NETWORK = "10.64.0.0/11"
# The sandbox blocks of the IP plan (docs/ip-plan.md: "sandboxes" 10.128.0.0/12 and
# "region-sandboxes" 10.144.0.0/12), every node's sandbox /27. Routed onto the WireGuard
# interface so a sandbox reaches the sandboxes of its own multi-node order on other nodes
# through the node-to-node peer that routes their /32s; the node's own sandboxes have /32
# routes onto their veths, which win. A destination no peer routes is dropped by WireGuard.
SANDBOX_NETWORK = "10.128.0.0/11"
CONNECTION_STATES = ("connecting", "connected", "disconnected", "refused", "stopped")

_NODE_ID_RE = re.compile(r"nd_[0-9a-f]{32}")
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', no whitespace, not '.'/'..'.
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class StateError(Exception):
    """A state file is missing, malformed or inconsistent; the message says which and why."""


def normalize_gateway_url(url: str) -> str:
    """``https://gw.example/`` -> ``https://gw.example``; refuse anything but http(s) URLs."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StateError(f"gateway URL {url!r} must start with http:// or https:// and name a host")
    if parts.query or parts.fragment:
        raise StateError(f"gateway URL {url!r} must not have a query or fragment")
    if parts.username or parts.password:
        raise StateError("gateway URL must not contain credentials")
    return text.rstrip("/")


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str, *, insecure: bool, what: str = "gateway URL") -> None:
    """Refuse plain http:// or ws:// to anything but this machine unless ``insecure``.

    Whoever answers the first plain-text join gets their key pinned as the gateway's, and from
    then on signs this node's peers: a man in the middle at join would own the node. Loopback
    never leaves the machine, so a local gateway (development, `make run`) needs no flag."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "ws") and not insecure and not _loopback(parts.hostname):
        secure = "https" if parts.scheme == "http" else "wss"
        raise StateError(
            f"{what} {url} is plain {parts.scheme}: anyone on the path could answer the join, "
            f"have their key pinned as the gateway's and control this node's peers; use "
            f"{secure}://, or pass --insecure on a network you trust"
        )


def validate_interface_name(name: str) -> str:
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise StateError(f"interface name {name!r} must be 1-15 letters, digits, '_', '.' or '-'")
    return name


def _field_error(cls: type[Any], name: str, problem: str) -> StateError:
    return StateError(f"{cls.__name__}.{name} {problem}")


def _check_fields(cls: type[Any], data: object) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise StateError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise StateError(f"{cls.__name__} has unknown fields: {', '.join(unknown[:5])}")
    for f in fields:
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in data:
            raise _field_error(cls, f.name, "is required")
    return dict(data)


def _want_str(cls: type[Any], name: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise _field_error(cls, name, "must be a non-empty string")
    return value


def _want_int(cls: type[Any], name: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _field_error(cls, name, f"must be an integer between {lo} and {hi}")
    return value


@dataclass(frozen=True)
class Enrollment:
    """What ``clawnode join`` learnt from the gateway, and the local choices made with it."""

    gateway: str  # normalized base URL, e.g. "https://molt.example"
    node_id: str
    name: str  # "node-47"
    mesh_address: str  # "10.100.128.47"
    gateway_public_key: str  # base64 Ed25519, pinned: desired state must be signed by it
    websocket_url: str  # "wss://molt.example/ws/agent/"
    interface: str = "molt0"
    listen_port: int = 51820
    backend: str = "auto"
    mesh_network: str = DEFAULT_MESH_NETWORK
    job_network: str = DEFAULT_JOB_NETWORK
    endpoint: str = ""  # as declared with --endpoint, "" when the gateway observes it
    enrolled_at: int = 0  # Unix seconds
    # Joined with --insecure: plain http/ws to a gateway off this machine was accepted.
    insecure: bool = False
    # The sequence of the key certificate that led to gateway_public_key (clawnode.repin); 0:
    # the key pinned at join. A certificate at or below it is never followed again.
    gateway_key_sequence: int = 0

    def __post_init__(self) -> None:
        cls = type(self)
        _want_str(cls, "gateway", self.gateway)
        if normalize_gateway_url(self.gateway) != self.gateway:
            raise _field_error(cls, "gateway", "must be a normalized http(s) URL")
        if not isinstance(self.node_id, str) or not _NODE_ID_RE.fullmatch(self.node_id):
            raise _field_error(cls, "node_id", "must be 'nd_' and 32 lowercase hex digits")
        if not isinstance(self.name, str) or not _NODE_NAME_RE.fullmatch(self.name):
            raise _field_error(cls, "name", "must be a short node name such as 'node-47'")
        _want_str(cls, "mesh_network", self.mesh_network)
        try:
            network = ipaddress.IPv4Network(self.mesh_network)
        except ValueError:
            raise _field_error(cls, "mesh_network", "must be an IPv4 network") from None
        _want_str(cls, "mesh_address", self.mesh_address)
        try:
            address = ipaddress.IPv4Address(self.mesh_address)
        except ValueError:
            raise _field_error(cls, "mesh_address", "must be an IPv4 address") from None
        if address not in network:
            raise _field_error(cls, "mesh_address", f"is outside the mesh network {network}")
        _want_str(cls, "job_network", self.job_network)
        try:
            jobs = ipaddress.IPv4Network(self.job_network)
        except ValueError:
            raise _field_error(
                cls, "job_network", "must be an IPv4 network written without host bits"
            ) from None
        if jobs.overlaps(network):
            # Routing part of the mesh block away from its on-link prefix would be ambiguous.
            raise _field_error(cls, "job_network", f"overlaps the mesh network {network}")
        _want_str(cls, "gateway_public_key", self.gateway_public_key)
        try:
            parse_ed25519_public_key(self.gateway_public_key)
        except InvalidKey as exc:
            raise _field_error(cls, "gateway_public_key", f"is invalid: {exc}") from None
        _want_str(cls, "websocket_url", self.websocket_url)
        parts = urlsplit(self.websocket_url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise _field_error(cls, "websocket_url", "must be a ws:// or wss:// URL")
        if not isinstance(self.insecure, bool):
            raise _field_error(cls, "insecure", "must be true or false")
        if self.gateway.startswith("https://") and parts.scheme != "wss":
            # The agent channel carries the signed desired state and the node's answers: a
            # gateway reached over TLS never hands it over to plain text.
            raise _field_error(cls, "websocket_url", "must be wss:// for an https:// gateway")
        try:
            check_transport(self.gateway, insecure=self.insecure)
            check_transport(self.websocket_url, insecure=self.insecure, what="agent channel")
        except StateError as exc:
            raise _field_error(cls, "gateway", str(exc)) from None
        try:
            validate_interface_name(self.interface)
        except StateError as exc:
            raise _field_error(cls, "interface", str(exc)) from None
        _want_int(cls, "listen_port", self.listen_port, 1, 65535)
        if self.backend not in BACKENDS:
            raise _field_error(cls, "backend", f"must be one of {', '.join(BACKENDS)}")
        _want_str(cls, "endpoint", self.endpoint, empty=True)
        _want_int(cls, "enrolled_at", self.enrolled_at, 0, 2**53 - 1)
        _want_int(cls, "gateway_key_sequence", self.gateway_key_sequence, 0, 2**53 - 1)

    @property
    def interface_address(self) -> str:
        """The node's address in CIDR form for its WireGuard interface: '10.100.128.47/17'."""
        return f"{self.mesh_address}/{ipaddress.IPv4Network(self.mesh_network).prefixlen}"

    @property
    def routes(self) -> tuple[str, ...]:
        """The networks routed onto the WireGuard interface besides its on-link prefix: the job
        block (buyers' addresses), the sandbox blocks (other nodes' sandboxes of a multi-node
        order), and the whole mesh when the saved mesh_network is narrower than it (an enrolment
        from before the gateway answered the whole mesh)."""
        mesh = ipaddress.IPv4Network(self.mesh_network)
        whole = ipaddress.IPv4Network(WHOLE_MESH_NETWORK)
        if mesh != whole and mesh.subnet_of(whole):
            return (self.job_network, SANDBOX_NETWORK, WHOLE_MESH_NETWORK)
        return (self.job_network, SANDBOX_NETWORK)

    @property
    def gateway_key(self) -> bytes:
        return parse_ed25519_public_key(self.gateway_public_key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Enrollment:
        return cls(**_check_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AgentStatus:
    """The daemon's view of its gateway connection, for ``clawnode status``."""

    state: str  # one of CONNECTION_STATES
    since: int  # Unix seconds when ``state`` began
    updated_at: int  # Unix seconds of the last write (heartbeats refresh it)
    pid: int  # the daemon's process id; a dead pid means the daemon is not running
    detail: str = ""  # e.g. the last error while reconnecting
    revision: int = 0  # last desired-state revision applied

    def __post_init__(self) -> None:
        cls = type(self)
        if self.state not in CONNECTION_STATES:
            raise _field_error(cls, "state", f"must be one of {', '.join(CONNECTION_STATES)}")
        _want_int(cls, "since", self.since, 0, 2**53 - 1)
        _want_int(cls, "updated_at", self.updated_at, 0, 2**53 - 1)
        _want_int(cls, "pid", self.pid, 0, 2**31 - 1)
        _want_str(cls, "detail", self.detail, empty=True)
        _want_int(cls, "revision", self.revision, 0, 2**53 - 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentStatus:
        return cls(**_check_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StateDir:
    """The files of one agent installation. Nothing is created until something is written."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def enrollment_path(self) -> Path:
        return self.path / ENROLLMENT_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    # -- identity ------------------------------------------------------------------------------

    def load_or_create_identity(self) -> tuple[Identity, bool]:
        """(identity, created). Creates the directory 0700 and the key 0600 when missing."""
        return Identity.load_or_create(self.identity_path)

    def load_identity(self) -> Identity | None:
        """The identity, or None when there is none yet (IdentityFileError if unsafe)."""
        try:
            return Identity.load(self.identity_path)
        except FileNotFoundError:
            return None

    # -- enrolment -----------------------------------------------------------------------------

    def load_enrollment(self) -> Enrollment | None:
        data = self._read_json(self.enrollment_path)
        if data is None:
            return None
        try:
            return Enrollment.from_dict(data)
        except (StateError, TypeError) as exc:
            raise StateError(f"{self.enrollment_path} is not a valid enrolment: {exc}") from None

    def save_enrollment(self, enrollment: Enrollment) -> None:
        self._write_json(self.enrollment_path, enrollment.to_dict())

    # -- daemon status -------------------------------------------------------------------------

    def read_status(self) -> AgentStatus | None:
        data = self._read_json(self.status_path)
        if data is None:
            return None
        try:
            return AgentStatus.from_dict(data)
        except (StateError, TypeError) as exc:
            raise StateError(f"{self.status_path} is not a valid status: {exc}") from None

    def write_status(self, status: AgentStatus) -> None:
        self._write_json(self.status_path, status.to_dict())

    # -- the firewall's sandbox rules -----------------------------------------------------------

    @property
    def sandbox_rules_path(self) -> Path:
        return self.path / SANDBOX_RULES_FILE

    def read_sandbox_rules(self) -> list[dict[str, Any]]:
        """The sandbox rules the firewall last held (clawnode.daemon), so a restarted agent
        confines each job peer to its sandbox from its first table, before any desired state
        arrives. Missing: none."""
        data = self._read_json(self.sandbox_rules_path)
        rules = data.get("rules") if isinstance(data, dict) else None
        if data is None:
            return []
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise StateError(f"{self.sandbox_rules_path} is not a list of sandbox rules")
        return rules

    def write_sandbox_rules(self, rules: list[dict[str, Any]]) -> None:
        self._write_json(self.sandbox_rules_path, {"rules": rules})

    # -- files ---------------------------------------------------------------------------------

    def _read_json(self, path: Path) -> Any:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise StateError(f"{path} is not valid JSON: {exc}") from None

    def _write_json(self, path: Path, data: Mapping[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        write_private_atomically(path, text.encode("utf-8"))


def _make_private_dir(directory: Path) -> None:
    # Like keys._make_private_dirs: directories we create get 0700; existing ones are left alone.
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        d.chmod(0o700)


def append_private(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created 0600), with no fsync: it survives the process dying
    at any point after this returns (the kernel has it), not a power cut. For what only a
    process crash can make needed (the epoch journal, clawnode.journal). An append that fails
    (a full disk) is taken back, so the next one does not continue a line cut short."""
    _make_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def write_private_atomically(path: Path, data: bytes) -> None:
    parent = path.parent
    _make_private_dir(parent)
    # mkstemp creates the file 0600 with O_EXCL: never readable by others, not for a moment.
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
