"""WireGuard backends: the agent's only way to touch WireGuard.

``WireGuardBackend`` is the interface; three implementations:

- ``UserspaceBackend``: runs ``wireguard-go IFACE`` (foreground, a child whose PID it holds) and
  configures it over its UAPI socket ``/var/run/wireguard/IFACE.sock`` (``set=1``/``get=1``,
  keys as 64 hex characters, ``errno=`` replies).
- ``KernelBackend``: the kernel's ``wireguard`` link type and generic netlink through pyroute2
  (>= 0.9.3): one peer per set call, every part of a multi-part dump read and merged.
- ``FakeBackend``: in memory, for tests of the daemon without WireGuard.

Addresses and links go through pyroute2's IPRoute for both real backends (clawnode.links); the
userspace backend does it in a short-lived child process, so the long-lived agent never imports
pyroute2. ``choose_backend`` implements ``--backend auto|kernel|userspace`` and says why it chose
what it chose.

Peers are changed one at a time (``set_peer`` is an upsert of one peer, ``remove_peer`` removes
one): never replace-all, which would reset every peer's counters and drop live sessions.

Key formats (design/network.md): base64 in this interface and for pyroute2, 64 hex characters
on the UAPI socket, raw bytes on netlink (pyroute2 encodes those).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from . import links
from .cidr import sorted_networks as _sorted_networks
from .keys import (
    InvalidKey,
    encode_key,
    parse_wireguard_private_key,
    parse_wireguard_public_key,
    wireguard_public_key,
)
from .links import WireGuardError, check_address, kernel_wireguard_available
from .wire import parse_endpoint

__all__ = [
    "UAPI_SOCKET_DIR",
    "FakeBackend",
    "KernelBackend",
    "PeerStatus",
    "PendingRead",
    "UserspaceBackend",
    "WireGuardBackend",
    "WireGuardError",
    "choose_backend",
    "hex_to_key",
    "kernel_wireguard_available",
    "key_to_hex",
    "parse_uapi_get",
    "parse_uapi_peers",
    "peers_from_netlink_dump",
]

UAPI_SOCKET_DIR = Path("/var/run/wireguard")
MAX_KEEPALIVE = 65535


@dataclass(frozen=True)
class PeerStatus:
    """One peer as the interface has it now."""

    public_key: str  # base64
    allowed_ips: tuple[str, ...]  # canonical CIDR strings, sorted
    endpoint: str = ""  # "ip:port" ("[ip6]:port"), "" until known
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: int = 0  # Unix seconds; 0 = never
    persistent_keepalive: int = 0  # seconds; 0 = off


class PendingRead(Protocol):
    """A read started by WireGuardBackend.start_read."""

    def peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]: ...

    def close(self) -> None: ...


class _ReadLater:
    """start_read of a backend that cannot split a read: read_peers when collected."""

    def __init__(self, backend: WireGuardBackend) -> None:
        self._backend = backend

    def peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        return self._backend.read_peers(public_keys)

    def close(self) -> None:
        pass


class WireGuardBackend(Protocol):
    """What the agent needs from WireGuard. All keys are base64 strings except the private key.

    Methods raise WireGuardError with a message naming the interface and what failed.
    """

    kind: str  # "kernel", "userspace" or "fake"

    @property
    def name(self) -> str: ...

    def ensure_interface(
        self, name: str, private_key: bytes, listen_port: int, address: str
    ) -> None:
        """Create (or adopt) interface ``name`` with this key, port and address (CIDR), and
        bring it up. Idempotent: existing peers and their counters are left alone."""
        ...

    def interface_exists(self) -> bool: ...

    def list_peers(self) -> dict[str, PeerStatus]: ...

    def read_peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        """The current status of these peers only (those the interface lacks are left out).
        Still one read of the whole device, but only these peers are parsed: the agent reads
        the last counters of peers it is about to remove."""
        ...

    def start_read(self) -> PendingRead:
        """Ask the device for its peers now, and collect them with ``peers(public_keys)`` (the
        same as read_peers) or drop them with ``close()``: the caller works while the device
        answers. The reading happens when collected where a read cannot be split."""
        ...

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str = "",
        keepalive: int = 0,
    ) -> None:
        """Add the peer or update it in place (counters kept): its allowed IPs are replaced
        by ``allowed_ips``, keepalive set, endpoint set when given ("" leaves it as learnt)."""
        ...

    def remove_peer(self, public_key: str) -> None: ...

    def delete_interface(self) -> None: ...


# -- validation and key encodings -----------------------------------------------------------------


def key_to_hex(key_b64: str) -> str:
    """base64 key -> 64 lowercase hex characters (the UAPI format)."""
    return parse_wireguard_public_key(key_b64).hex()


def hex_to_key(text: str) -> str:
    """64 hex characters (UAPI) -> base64 key."""
    if len(text) != 64:
        raise WireGuardError(f"UAPI key must be 64 hex characters, got {len(text)}")
    try:
        return encode_key(bytes.fromhex(text))
    except ValueError:
        raise WireGuardError("UAPI key is not hexadecimal") from None


def _check_public_key(public_key: str) -> str:
    try:
        parse_wireguard_public_key(public_key)
    except InvalidKey as exc:
        raise WireGuardError(str(exc), errno_mod.EINVAL) from None
    return public_key


def _check_allowed_ips(allowed_ips: Sequence[str]) -> tuple[str, ...]:
    if isinstance(allowed_ips, str):
        raise WireGuardError("allowed_ips must be a list of CIDR strings, not one string")
    out = []
    for text in allowed_ips:
        try:
            out.append(str(ipaddress.ip_network(text, strict=True)))
        except (ValueError, TypeError):
            raise WireGuardError(
                f"allowed IP {text!r} is not a network", errno_mod.EINVAL
            ) from None
    return tuple(out)


def _check_keepalive(keepalive: int) -> int:
    if not isinstance(keepalive, int) or isinstance(keepalive, bool):
        raise WireGuardError("keepalive must be an integer", errno_mod.EINVAL)
    if not 0 <= keepalive <= MAX_KEEPALIVE:
        raise WireGuardError(f"keepalive must be 0-{MAX_KEEPALIVE} s", errno_mod.EINVAL)
    return keepalive


def resolve_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` -> (IP literal, port). Neither UAPI nor netlink take host names, so names
    are resolved here (as ``wg`` does), preferring IPv4."""
    try:
        host, port = parse_endpoint(endpoint)
    except ValueError as exc:
        raise WireGuardError(str(exc), errno_mod.EINVAL) from None
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise WireGuardError(f"cannot resolve endpoint host {host!r}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), port


def _format_endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# -- addresses and links (IPRoute through clawnode.links, shared by both real backends) ----------


def kernel_wireguard_available_in_child() -> tuple[bool, str]:
    """kernel_wireguard_available, asked in a child process so this one does not import
    pyroute2 (for `clawnode run --backend auto`, which may end up on wireguard-go)."""
    try:
        available, why = links.in_child("probe-kernel")
    except WireGuardError as exc:
        return False, f"cannot probe the kernel for WireGuard: {exc}"
    return bool(available), str(why)


def _same_private_key(a: bytes, b: bytes) -> bool:
    # Devices report the clamped scalar; compare through the public keys, which ignore clamping.
    return wireguard_public_key(a) == wireguard_public_key(b)


class _Named:
    """The name bookkeeping every backend shares."""

    def __init__(self, name: str = "") -> None:
        self._name = name

    @property
    def name(self) -> str:
        if not self._name:
            raise WireGuardError("no interface yet: call ensure_interface first")
        return self._name

    def _bind_name(self, name: str) -> None:
        if not name or len(name) > 15 or "/" in name or name.strip() != name:
            raise WireGuardError(f"interface name {name!r} must be 1-15 characters, no '/'")
        if self._name and self._name != name:
            raise WireGuardError(f"this backend manages {self._name}, not {name}")
        self._name = name


# -- userspace: wireguard-go and its UAPI socket -------------------------------------------------


def _uapi_error(code: int) -> str:
    name = errno_mod.errorcode.get(code, "")
    return f"errno {code}" + (f" ({name}: {os.strerror(code)})" if name else "")


# The peer fields of a get=1 reply the agent keeps, and the PeerStatus field each fills.
_UAPI_PEER_INTS = {
    "rx_bytes": "rx_bytes",
    "tx_bytes": "tx_bytes",
    "last_handshake_time_sec": "last_handshake",
    "persistent_keepalive_interval": "persistent_keepalive",
}


def parse_uapi_get(text: str) -> tuple[dict[str, str], dict[str, PeerStatus]]:
    """Parse a ``get=1`` reply (without its ``errno=`` line) into device fields and peers."""
    device: dict[str, str] = {}
    peers: dict[str, PeerStatus] = {}
    key = ""
    allowed: list[str] = []
    fields: dict[str, Any] = {}
    ints = _UAPI_PEER_INTS
    for line in text.split("\n"):
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(f"unexpected UAPI line {line[:80]!r}")
        if name == "public_key":
            if key:
                peers[key] = PeerStatus(key, _sorted_networks(allowed), **fields)
            key, allowed, fields = hex_to_key(value), [], {}
        elif not key:
            device[name] = value
        elif name == "allowed_ip":
            allowed.append(value)
        elif name in ints:
            fields[ints[name]] = int(value)
        elif name == "endpoint":
            fields["endpoint"] = value
        # preshared_key, protocol_version, last_handshake_time_nsec: not needed
    if key:
        peers[key] = PeerStatus(key, _sorted_networks(allowed), **fields)
    return device, peers


def parse_uapi_peers(
    reply: str | bytes | bytearray, public_keys: Collection[str]
) -> dict[str, PeerStatus]:
    """The peers named by ``public_keys`` (base64) from a ``get=1`` reply, parsing only their
    lines: each peer's part is found by its key and ends where the next peer's begins. Peers the
    reply does not have are left out.

    ``reply`` may be the raw bytes off the socket: only the parts of the peers asked for are
    decoded (a reply for a thousand peers is some 300 kB, and the agent reads it to take the
    last counters of the one peer it is about to remove)."""
    data = reply.encode("utf-8") if isinstance(reply, str) else reply
    size = len(data)
    peers: dict[str, PeerStatus] = {}
    for public_key in public_keys:
        marker = b"public_key=" + key_to_hex(public_key).encode("ascii")
        start = data.find(marker)
        # Only a whole line starts a peer (a preshared key may hold the same hex).
        while start != -1 and not (
            (start == 0 or data[start - 1] == 0x0A)
            and (start + len(marker) == size or data[start + len(marker)] == 0x0A)
        ):
            start = data.find(marker, start + 1)
        if start == -1:
            continue
        end = data.find(b"\npublic_key=", start + len(marker))
        # Cut at "\n" and at an ASCII marker: never inside a multi-byte character, so decoding
        # the part gives what decoding the whole reply would.
        part = data[start:] if end == -1 else data[start:end]
        _, found = parse_uapi_get(bytes(part).decode("utf-8", "replace"))
        peers.update(found)
    return peers


class _UapiCall:
    """One UAPI request, sent; ``reply()`` waits for the answer and closes the connection."""

    def __init__(
        self, backend: UserspaceBackend, sock: socket.socket, what: str, log_offset: int
    ) -> None:
        self._backend, self._sock, self._what, self._log_offset = backend, sock, what, log_offset

    def reply(self) -> bytearray:
        backend, what = self._backend, self._what
        try:
            with backend._socket_errors(what):
                reply = bytearray()
                # The reply ends with an empty line; the connection stays open for more requests.
                while not reply.endswith(b"\n\n"):
                    chunk = self._sock.recv(65536)
                    if not chunk:
                        raise WireGuardError(
                            f"{what} on {backend.name}: wireguard-go closed the socket"
                        )
                    reply += chunk
        finally:
            self._sock.close()
        return backend._check_reply(reply, what, self._log_offset)

    def close(self) -> None:
        self._sock.close()


class _UapiRead:
    """A read of some peers whose ``get=1`` is already sent (UserspaceBackend.start_read)."""

    def __init__(self, call: _UapiCall) -> None:
        self._call = call

    def peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        try:
            for public_key in public_keys:
                _check_public_key(public_key)
        except BaseException:
            self.close()
            raise
        return parse_uapi_peers(self._call.reply(), public_keys)

    def close(self) -> None:
        self._call.close()


class UserspaceBackend(_Named):
    """wireguard-go plus its UAPI socket.

    ``ensure_interface`` adopts a wireguard-go already serving the interface (an agent restart
    must not drop live tunnels or reset counters), else starts one in the foreground as a child
    in its own session, so a signal to the agent's terminal or process group does not take the
    tunnels down. ``pid`` is that child's PID (None when adopted). ``delete_interface`` removes
    the link and stops the child.
    """

    kind = "userspace"

    def __init__(
        self,
        name: str = "",
        *,
        wireguard_go: str = "wireguard-go",
        socket_dir: str | os.PathLike[str] = UAPI_SOCKET_DIR,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(name)
        self._wireguard_go = wireguard_go
        self._socket_dir = Path(socket_dir)
        self._timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None  # wireguard-go's stdout+stderr, for error messages

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def socket_path(self) -> Path:
        return self._socket_dir / f"{self.name}.sock"

    # -- the UAPI protocol ------------------------------------------------------------------------

    def _request(self, request: str, what: str) -> str:
        return self._exchange(request, what).decode("utf-8", "replace")

    def _exchange(self, request: str, what: str) -> bytearray:
        """Send one UAPI request; the reply's "k=v" lines as bytes (errno checked)."""
        return self._send(request, what).reply()

    def _send(self, request: str, what: str) -> _UapiCall:
        """Connect and send ``request``; the reply is for the returned call's ``reply()``."""
        log_offset = self._log_size()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._socket_errors(what):
                sock.settimeout(self._timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(request.encode("ascii"))
        except BaseException:
            sock.close()
            raise
        return _UapiCall(self, sock, what, log_offset)

    @contextlib.contextmanager
    def _socket_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise WireGuardError(
                f"{what} on {self.name}: no wireguard-go is serving it ({self.socket_path} is "
                "missing)",
                errno_mod.ENODEV,
            ) from None
        except ConnectionRefusedError:
            raise WireGuardError(
                f"{what} on {self.name}: {self.socket_path} is stale (wireguard-go is gone)",
                errno_mod.ECONNREFUSED,
            ) from None
        except TimeoutError:
            raise WireGuardError(
                f"{what} on {self.name}: wireguard-go did not answer in {self._timeout:g} s",
                errno_mod.ETIMEDOUT,
            ) from None
        except OSError as exc:
            raise WireGuardError(f"{what} on {self.name}: {exc}", exc.errno or 0) from None

    def _check_reply(self, reply: bytearray, what: str, log_offset: int) -> bytearray:
        """A whole reply: "k=v" lines (a get reply), then "errno=N" and the empty line. Split as
        bytes: a get reply is decoded only as far as the caller needs it (parse_uapi_peers)."""
        trimmed = len(reply)
        while trimmed and reply[trimmed - 1] == 0x0A:
            trimmed -= 1
        cut = reply.rfind(b"\n", 0, trimmed)
        last = bytes(reply[cut + 1 : trimmed]).decode("utf-8", "replace")
        body = reply[: max(cut, 0)]
        if not last.startswith("errno="):
            raise WireGuardError(f"{what} on {self.name}: malformed UAPI reply {last[:80]!r}")
        try:
            code = -int(last.removeprefix("errno="))  # wireguard-go sends negative errnos
        except ValueError:
            raise WireGuardError(f"{what} on {self.name}: malformed UAPI {last[:80]!r}") from None
        if code:
            detail = self._log_since(log_offset)
            message = f"{what} on {self.name} refused by wireguard-go: {_uapi_error(code)}"
            raise WireGuardError(message + (f": {detail}" if detail else ""), abs(code))
        return body

    def _get(self) -> tuple[dict[str, str], dict[str, PeerStatus]]:
        return parse_uapi_get(self._request("get=1\n\n", "reading configuration"))

    def _set(self, lines: Sequence[str], what: str) -> None:
        # Every value was validated or produced by us: no newline can reach the socket and
        # smuggle in another command.
        self._request("set=1\n" + "".join(line + "\n" for line in lines) + "\n", what)

    def _log_size(self) -> int:
        if self._log is None:
            return 0
        return os.fstat(self._log.fileno()).st_size

    def _log_since(self, offset: int) -> str:
        """wireguard-go's error lines written since ``offset`` (its IPC error text)."""
        if self._log is None:
            return ""
        # pread: the child shares the file offset; reading must not move it.
        data = os.pread(self._log.fileno(), 4096, offset).decode("utf-8", "replace")
        lines = [line.strip() for line in data.splitlines() if line.strip()]
        return lines[-1][-300:] if lines else ""

    def _alive(self) -> bool:
        try:
            self._request("get=1\n\n", "probing")
        except WireGuardError:
            return False
        return True

    # -- the interface ----------------------------------------------------------------------------

    def interface_exists(self) -> bool:
        return self.socket_path.exists() and self._alive()

    def ensure_interface(
        self, name: str, private_key: bytes, listen_port: int, address: str
    ) -> None:
        self._bind_name(name)
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise WireGuardError("private key must be 32 bytes")
        check_address(address)
        started = False
        if not self._alive():
            self._start()
            started = True
        try:
            device, _peers = self._get()
            lines = []
            current_key = device.get("private_key", "")
            if not current_key or not _same_private_key(bytes.fromhex(current_key), private_key):
                lines.append(f"private_key={private_key.hex()}")
            # Rebinding the port is not free (the UDP socket is reopened): only when it differs.
            if device.get("listen_port") != str(listen_port):
                lines.append(f"listen_port={int(listen_port)}")
            if lines:
                self._set(lines, "setting key and listen port")
            # In a child process: the agent itself never imports pyroute2 (clawnode.links).
            links.in_child("configure", name, address)
        except BaseException:
            if started:
                self.delete_interface()  # do not leave a half-configured interface behind
            raise

    def _start(self) -> None:
        executable = shutil.which(self._wireguard_go)
        if executable is None:
            raise WireGuardError(
                f"{self._wireguard_go} not found on PATH (apt-get install wireguard-go)",
                errno_mod.ENOENT,
            )
        # A socket left by a wireguard-go that died would make the wait below succeed on a stale
        # file; _alive() just said nobody answers on it.
        self.socket_path.unlink(missing_ok=True)
        # Lives as long as the child (closed in delete_interface), hence no `with`.
        self._log = tempfile.TemporaryFile(prefix=f"wireguard-go-{self.name}-")  # noqa: SIM115
        # WG_PROCESS_FOREGROUND=1: stay in the foreground so we hold the real PID (it would
        # otherwise fork and exit). Never set it to 0 (design/testing.md).
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        self._process = subprocess.Popen(
            [executable, self.name],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                output = self._log_since(0)
                code = self._process.returncode
                self._process = None
                self._log.close()
                self._log = None
                raise WireGuardError(
                    f"wireguard-go {self.name} exited with status {code}"
                    + (f": {output}" if output else "")
                )
            if self.socket_path.exists() and self._alive():
                return
            time.sleep(0.02)
        self._stop_process()
        raise WireGuardError(
            f"wireguard-go {self.name} did not open {self.socket_path} in {self._timeout:g} s",
            errno_mod.ETIMEDOUT,
        )

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def delete_interface(self) -> None:
        """Remove the link (wireguard-go exits when its TUN device goes) and stop our child."""
        links.in_child("delete", self.name)
        self._stop_process()
        # An adopted wireguard-go (not our child) exits by itself once its TUN device is gone;
        # wait for that, so the name is free again when this returns.
        deadline = time.monotonic() + self._timeout
        while self.socket_path.exists() and self._alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.socket_path.exists() and not self._alive():
            self.socket_path.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- peers ------------------------------------------------------------------------------------

    def list_peers(self) -> dict[str, PeerStatus]:
        return self._get()[1]

    def read_peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        return self.start_read().peers(public_keys)

    def start_read(self) -> PendingRead:
        # The get is sent now; wireguard-go writes the whole device (milliseconds at a thousand
        # peers) while the caller does something else.
        return _UapiRead(self._send("get=1\n\n", "reading peers"))

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str = "",
        keepalive: int = 0,
    ) -> None:
        _check_public_key(public_key)
        networks = _check_allowed_ips(allowed_ips)
        lines = [
            f"public_key={key_to_hex(public_key)}",
            # Replace this peer's allowed IPs only; other peers are untouched.
            "replace_allowed_ips=true",
            *(f"allowed_ip={network}" for network in networks),
            f"persistent_keepalive_interval={_check_keepalive(keepalive)}",
        ]
        if endpoint:
            lines.append(f"endpoint={_format_endpoint(*resolve_endpoint(endpoint))}")
        self._set(lines, f"setting peer {public_key}")

    def remove_peer(self, public_key: str) -> None:
        _check_public_key(public_key)
        self._set(
            [f"public_key={key_to_hex(public_key)}", "remove=true"],
            f"removing peer {public_key}",
        )


# -- kernel: generic netlink through pyroute2 -----------------------------------------------------


def _decode_key_attr(value: object) -> str:
    # pyroute2 decodes key attributes to base64 bytes.
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def peers_from_netlink_dump(messages: Iterable[Any]) -> dict[str, PeerStatus]:
    """Merge every part of a WG_CMD_GET_DEVICE dump into one PeerStatus per peer.

    The kernel splits a large device over several messages; a peer whose allowed IPs do not fit
    continues in the next message, which repeats its public key with the remaining allowed IPs
    (and no counters). Reading only the first part would lose peers; overwriting on the repeat
    would lose allowed IPs or counters.
    """
    peers: dict[str, PeerStatus] = {}
    for message in messages:
        for peer in message.get_attr("WGDEVICE_A_PEERS") or ():
            key = _decode_key_attr(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            allowed = [
                ip["addr"] for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or () if "addr" in ip
            ]
            endpoint = ""
            raw_endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
            if raw_endpoint and raw_endpoint.get("port"):
                endpoint = _format_endpoint(raw_endpoint["addr"], raw_endpoint["port"])
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            fields: dict[str, Any] = {}
            if endpoint:
                fields["endpoint"] = endpoint
            for attr, name in (
                ("WGPEER_A_RX_BYTES", "rx_bytes"),
                ("WGPEER_A_TX_BYTES", "tx_bytes"),
                ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", "persistent_keepalive"),
            ):
                value = peer.get_attr(attr)
                if value is not None:
                    fields[name] = int(value)
            if handshake:
                fields["last_handshake"] = int(handshake.get("tv_sec", 0))
            previous = peers.get(key)
            if previous is None:
                peers[key] = PeerStatus(
                    public_key=key, allowed_ips=_sorted_networks(allowed), **fields
                )
            else:
                merged = _sorted_networks((*previous.allowed_ips, *allowed))
                peers[key] = replace(previous, allowed_ips=merged, **fields)
    return peers


def _kernel_peer(
    public_key: str, allowed_ips: Sequence[str], endpoint: str, keepalive: int
) -> dict[str, Any]:
    """The pyroute2 peer dict for one set call: replaces this peer's allowed IPs only."""
    peer: dict[str, Any] = {
        "public_key": _check_public_key(public_key),
        "allowed_ips": list(_check_allowed_ips(allowed_ips)),
        "replace_allowed_ips": True,
        "persistent_keepalive": _check_keepalive(keepalive),
    }
    if endpoint:
        peer["endpoint_addr"], peer["endpoint_port"] = resolve_endpoint(endpoint)
    return peer


class KernelBackend(_Named):
    """The kernel's WireGuard through pyroute2's IPRoute (link) and WireGuard (genl) sockets."""

    kind = "kernel"

    @contextlib.contextmanager
    def _wg(self, what: str) -> Iterator[Any]:
        _, WireGuard, NetlinkError = links.pyroute2()
        try:
            sock = WireGuard()
        except NetlinkError as exc:
            if getattr(exc, "code", 0) == errno_mod.ENOENT:
                raise WireGuardError(
                    f"{what} on {self.name}: the kernel has no WireGuard (use --backend userspace)",
                    errno_mod.EOPNOTSUPP,
                ) from None
            raise links.netlink_error(exc, f"{what} on {self.name}") from None
        try:
            yield sock
        except NetlinkError as exc:
            raise links.netlink_error(exc, f"{what} on {self.name}") from None
        finally:
            sock.close()

    def _dump(self, what: str) -> list[Any]:
        with self._wg(what) as wg:
            return list(wg.info(self.name))

    def interface_exists(self) -> bool:
        return links.link_exists(self.name)

    def ensure_interface(
        self, name: str, private_key: bytes, listen_port: int, address: str
    ) -> None:
        IPRoute, _, NetlinkError = links.pyroute2()
        self._bind_name(name)
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise WireGuardError("private key must be 32 bytes")
        check_address(address)
        available, why = kernel_wireguard_available()
        if not available:
            raise WireGuardError(f"cannot create {name}: {why}", errno_mod.EOPNOTSUPP)
        try:
            with IPRoute() as ipr:
                if links.link_index(ipr, name) is None:
                    ipr.link("add", ifname=name, kind="wireguard")
        except NetlinkError as exc:
            raise links.netlink_error(exc, f"creating interface {name}") from None
        current_key = b""
        current_port = None
        for message in self._dump("reading configuration"):
            key = message.get_attr("WGDEVICE_A_PRIVATE_KEY")
            if key:
                current_key = parse_wireguard_private_key(_decode_key_attr(key))
            port = message.get_attr("WGDEVICE_A_LISTEN_PORT")
            if port is not None:
                current_port = int(port)
        settings: dict[str, Any] = {}
        if not current_key or not _same_private_key(current_key, private_key):
            settings["private_key"] = encode_key(private_key)
        if current_port != listen_port:
            settings["listen_port"] = int(listen_port)
        if settings:
            with self._wg("setting key and listen port") as wg:
                wg.set(self.name, **settings)
        links.configure_link(name, address)

    def list_peers(self) -> dict[str, PeerStatus]:
        return peers_from_netlink_dump(self._dump("reading peers"))

    def read_peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        # A netlink dump is of the whole device; there is no cheaper way to a peer's counters.
        peers = self.list_peers()
        return {key: peers[key] for key in public_keys if key in peers}

    def start_read(self) -> PendingRead:
        return _ReadLater(self)

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str = "",
        keepalive: int = 0,
    ) -> None:
        peer = _kernel_peer(public_key, allowed_ips, endpoint, keepalive)
        with self._wg(f"setting peer {public_key}") as wg:
            wg.set(self.name, peer=peer)

    def remove_peer(self, public_key: str) -> None:
        _check_public_key(public_key)
        with self._wg(f"removing peer {public_key}") as wg:
            wg.set(self.name, peer={"public_key": public_key, "remove": True})

    def delete_interface(self) -> None:
        links.delete_link(self.name)


# -- in memory ------------------------------------------------------------------------------------


class FakeBackend(_Named):
    """WireGuard in memory, with the real backends' semantics: upserts keep counters, one peer
    per allowed network (a later peer takes the network over, as WireGuard does).

    Test hooks: ``add_traffic`` moves counters and the handshake; ``refuse[public_key] = msg``
    makes the next changes of that peer fail like a device refusing them.
    """

    kind = "fake"

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.exists = False
        self.private_key = b""
        self.listen_port = 0
        self.address = ""
        self.peers: dict[str, PeerStatus] = {}
        self.refuse: dict[str, str] = {}
        # (operation, public key or name), in order; reads too: ("list_peers", name) for the
        # whole device, ("read_peers", key) for each peer asked for.
        self.calls: list[tuple[str, str]] = []

    def interface_exists(self) -> bool:
        return self.exists

    def ensure_interface(
        self, name: str, private_key: bytes, listen_port: int, address: str
    ) -> None:
        self._bind_name(name)
        check_address(address)
        self.calls.append(("ensure_interface", name))
        self.exists = True
        self.private_key, self.listen_port, self.address = private_key, listen_port, address

    def _require(self) -> None:
        if not self.exists:
            raise WireGuardError(f"interface {self._name or '?'} does not exist", errno_mod.ENODEV)

    def list_peers(self) -> dict[str, PeerStatus]:
        self._require()
        self.calls.append(("list_peers", self._name))
        return dict(self.peers)

    def read_peers(self, public_keys: Collection[str]) -> dict[str, PeerStatus]:
        self._require()
        self.calls.extend(("read_peers", key) for key in public_keys)
        return {key: self.peers[key] for key in public_keys if key in self.peers}

    def start_read(self) -> PendingRead:
        return _ReadLater(self)

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str = "",
        keepalive: int = 0,
    ) -> None:
        self._require()
        _check_public_key(public_key)
        networks = _sorted_networks(_check_allowed_ips(allowed_ips))
        _check_keepalive(keepalive)
        if endpoint:
            resolve_endpoint(endpoint)
        self.calls.append(("set_peer", public_key))
        if public_key in self.refuse:
            raise WireGuardError(self.refuse[public_key], errno_mod.EIO)
        for other_key, other in list(self.peers.items()):
            if other_key != public_key and set(other.allowed_ips) & set(networks):
                kept = tuple(n for n in other.allowed_ips if n not in networks)
                self.peers[other_key] = replace(other, allowed_ips=kept)
        previous = self.peers.get(public_key) or PeerStatus(public_key=public_key, allowed_ips=())
        self.peers[public_key] = replace(
            previous,
            allowed_ips=networks,
            endpoint=endpoint or previous.endpoint,
            persistent_keepalive=keepalive,
        )

    def remove_peer(self, public_key: str) -> None:
        self._require()
        _check_public_key(public_key)
        self.calls.append(("remove_peer", public_key))
        if public_key in self.refuse:
            raise WireGuardError(self.refuse[public_key], errno_mod.EIO)
        self.peers.pop(public_key, None)

    def delete_interface(self) -> None:
        self.calls.append(("delete_interface", self._name))
        self.exists = False
        self.peers.clear()

    def add_traffic(self, public_key: str, rx: int, tx: int, handshake_at: int = 0) -> None:
        peer = self.peers[public_key]
        self.peers[public_key] = replace(
            peer,
            rx_bytes=peer.rx_bytes + rx,
            tx_bytes=peer.tx_bytes + tx,
            last_handshake=handshake_at or int(time.time()),
        )


# -- choosing -------------------------------------------------------------------------------------


BackendClass = type[UserspaceBackend] | type[KernelBackend]


def choose_backend(
    kind: str,
    *,
    kernel_probe: Any = kernel_wireguard_available,
    which: Any = shutil.which,
) -> tuple[BackendClass, str]:
    """``--backend`` -> (backend class, why). ``auto``: kernel when the running kernel has
    WireGuard, else wireguard-go. Raises WireGuardError when the choice cannot work here."""
    if kind not in ("auto", "kernel", "userspace"):
        raise WireGuardError(f"backend must be auto, kernel or userspace, not {kind!r}")
    if kind in ("auto", "kernel"):
        available, why = kernel_probe()
        if available:
            return KernelBackend, f"kernel: {why}"
        if kind == "kernel":
            raise WireGuardError(f"--backend kernel cannot work here: {why}", errno_mod.EOPNOTSUPP)
    has_go = which("wireguard-go") is not None
    if kind == "userspace":
        if not has_go:
            raise WireGuardError(
                "--backend userspace needs wireguard-go on PATH (apt-get install wireguard-go)",
                errno_mod.ENOENT,
            )
        return UserspaceBackend, "userspace: wireguard-go (chosen with --backend userspace)"
    if not has_go:
        raise WireGuardError(
            f"no WireGuard here: {why}, and wireguard-go is not on PATH "
            "(apt-get install wireguard-go)",
            errno_mod.ENOENT,
        )
    return UserspaceBackend, f"userspace: wireguard-go, because {why}"
