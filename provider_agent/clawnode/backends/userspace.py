"""The userspace backend: ``wireguard-go IFACE`` (foreground, a child whose PID it holds),
configured over its UAPI socket ``/var/run/wireguard/IFACE.sock`` (``set=1``/``get=1``, keys as
64 hex characters, ``errno=`` replies; the text is parsed in backends.uapi).

The interface's address and link go through pyroute2 in a short-lived child process
(backends.links), so the long-lived agent on this backend never imports pyroute2.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import links
from .base import (
    NamedInterface,
    PeerStatus,
    PendingRead,
    check_allowed_ips,
    check_keepalive,
    check_public_key,
    format_endpoint,
    resolve_endpoint,
    same_private_key,
)
from .errors import WireGuardError
from .links import check_address
from .uapi import key_to_hex, parse_uapi_get, parse_uapi_peers, uapi_error

__all__ = ["UAPI_SOCKET_DIR", "UserspaceBackend"]

UAPI_SOCKET_DIR = Path("/var/run/wireguard")


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
                check_public_key(public_key)
        except BaseException:
            self.close()
            raise
        return parse_uapi_peers(self._call.reply(), public_keys)

    def close(self) -> None:
        self._call.close()


class UserspaceBackend(NamedInterface):
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
            message = f"{what} on {self.name} refused by wireguard-go: {uapi_error(code)}"
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
        self,
        name: str,
        private_key: bytes,
        listen_port: int,
        address: str,
        routes: Sequence[str] = (),
    ) -> None:
        self._bind_name(name)
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise WireGuardError("private key must be 32 bytes")
        check_address(address)
        wanted_routes = links.check_routes(routes)
        started = False
        if not self._alive():
            self._start()
            started = True
        try:
            device, _peers = self._get()
            lines = []
            current_key = device.get("private_key", "")
            if not current_key or not same_private_key(bytes.fromhex(current_key), private_key):
                lines.append(f"private_key={private_key.hex()}")
            # Rebinding the port is not free (the UDP socket is reopened): only when it differs.
            if device.get("listen_port") != str(listen_port):
                lines.append(f"listen_port={int(listen_port)}")
            if lines:
                self._set(lines, "setting key and listen port")
            # In a child process: the agent itself never imports pyroute2 (backends.links).
            links.in_child("configure", name, address, *wanted_routes)
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
        check_public_key(public_key)
        networks = check_allowed_ips(allowed_ips)
        lines = [
            f"public_key={key_to_hex(public_key)}",
            # Replace this peer's allowed IPs only; other peers are untouched.
            "replace_allowed_ips=true",
            *(f"allowed_ip={network}" for network in networks),
            f"persistent_keepalive_interval={check_keepalive(keepalive)}",
        ]
        if endpoint:
            lines.append(f"endpoint={format_endpoint(*resolve_endpoint(endpoint))}")
        self._set(lines, f"setting peer {public_key}")

    def remove_peer(self, public_key: str) -> None:
        check_public_key(public_key)
        self._set(
            [f"public_key={key_to_hex(public_key)}", "remove=true"],
            f"removing peer {public_key}",
        )
