"""The Docker engine: the Docker Engine REST API over its unix socket (stdlib http.client, no
client library), behind the same engine.Engine interface as the Podman engine.

Containers are created and started detached (containerd's shim parents them, not the agent), so
an agent restart leaves sandboxes running; every MOLT container carries LABEL_MANAGED and
LABEL_REF, and ``containers`` and ``remove`` never look past them.

The network: Docker cannot join a container to a named network namespace (no ``ns:`` mode). So
the container starts with ``NetworkMode: none`` (its own empty namespace), and the agent then
moves the sandbox's inner veth into it (clawnode.sandbox.netjoin, which the Podman engine uses
too when it runs containers in user namespaces).

GPUs go as CDI device requests (``DeviceRequests: [{"Driver": "cdi", "DeviceIDs": [...]}]``),
which Docker 25+ accepts (with CDI enabled in its daemon.json). The start checks the created
container carries them (inspect) and fails otherwise: Podman 4.3's compat API accepts the body
but drops the request, which would leave a GPU sandbox without its GPUs.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from .engine import (
    LABEL_MANAGED,
    LABEL_REF,
    Container,
    ContainerSpec,
    EngineError,
    start_or_remove,
)
from .netjoin import join_netns
from .quota import DiskQuota, docker_store_quota, read_mounts

__all__ = ["DEFAULT_DOCKER_HOST", "DockerEngine"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
API = "/v1.41"  # Docker 20.10+; Podman's compat service answers it too
_MAX_DETAIL = 300
log = logging.getLogger(__name__)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _socket_path(host: str) -> str:
    if not host.startswith("unix://"):
        raise ValueError(f"docker host {host!r} is not unix:///path (only a local socket)")
    return host[len("unix://") :]


class DockerEngine:
    def __init__(
        self,
        *,
        host: str = "",
        ulimits: Mapping[str, int] | None = None,
        timeout: float = 120.0,
        pull_timeout: float = 3600.0,
    ) -> None:
        self._socket = _socket_path(host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST)
        self._ulimits = dict(ulimits or {})
        self._timeout = timeout
        self._pull_timeout = pull_timeout
        self._quota: DiskQuota | None = None

    # -- the API ------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        ok: tuple[int, ...] = (200, 201, 204),
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        conn = _UnixConnection(self._socket, timeout or self._timeout)
        what = f"docker {method} {path.split('?')[0]}"
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, API + path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except FileNotFoundError as exc:
            raise EngineError(f"the docker socket {self._socket} does not exist") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"{what} failed: {exc}") from exc
        finally:
            conn.close()
        if response.status not in ok:
            raise EngineError(f"{what} failed: {self._message(data)}")
        return response.status, data

    @staticmethod
    def _message(data: bytes) -> str:
        """The engine's own error message ({"message": ...}), trimmed; never the request."""
        try:
            text = str(json.loads(data).get("message", ""))
        except (ValueError, AttributeError):
            text = data.decode(errors="replace")
        return (text.strip() or "no message")[:_MAX_DETAIL]

    def _json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        _, data = self._request(method, path, body, **kw)
        return json.loads(data or b"null")

    def disk_quota(self) -> DiskQuota:
        """Whether the daemon's store holds each sandbox to its disk_gb (GET /info and the
        mount under DockerRootDir, clawnode.sandbox.quota): asked once, said once in the log.
        The agent reads /proc/mounts of its own host: the daemon's, for a local socket."""
        if self._quota is None:
            try:
                info = self._json("GET", "/info") or {}
            except (EngineError, ValueError) as exc:
                self._quota = DiskQuota(False, f"docker /info did not say ({exc})")
            else:
                self._quota = docker_store_quota(info, read_mounts())
            if self._quota.enforced:
                log.info("disk per job enforced: %s", self._quota.reason)
            else:
                log.warning(
                    "disk per job (disk_gb) is NOT enforced on this docker store: %s; "
                    "sandboxes start without a disk limit (docs/provider.md)",
                    self._quota.reason,
                )
        return self._quota

    # -- Engine -------------------------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        status, _ = self._request("GET", f"/images/{_q(image)}/json", ok=(200, 404))
        return status == 200

    def pull(self, image: str, progress: Callable[[int], None]) -> None:
        """POST /images/create: a stream of JSON lines, one per layer event; each layer that
        completes moves the figure towards 95 (95 * done / seen), the end to 100."""
        progress(0)
        name, tag = _split_tag(image)
        query = urllib.parse.urlencode({"fromImage": name, "tag": tag})
        conn = _UnixConnection(self._socket, self._pull_timeout)
        seen: set[str] = set()
        done: set[str] = set()
        shown = 0
        try:
            conn.request("POST", f"{API}/images/create?{query}")
            response = conn.getresponse()
            if response.status != 200:
                raise EngineError(f"pulling {image} failed: {self._message(response.read())}")
            for line in response:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("error"):
                    raise EngineError(f"pulling {image} failed: {str(event['error'])[:200]}")
                layer, status = event.get("id"), str(event.get("status", ""))
                if layer and status != "Pulling from":
                    seen.add(layer)
                    if status in ("Pull complete", "Already exists"):
                        done.add(layer)
                if seen:
                    value = 95 * len(done) // len(seen)
                    if value > shown:
                        shown = value
                        progress(value)
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"pulling {image} failed: {exc}") from exc
        finally:
            conn.close()
        if not self.has_image(image):
            raise EngineError(f"pulling {image} failed: the image is not there after the pull")
        progress(100)

    def create_body(self, spec: ContainerSpec, *, disk_quota: bool = False) -> dict[str, Any]:
        """The body of POST /containers/create for ``spec`` (a method of its own: the unit
        tests read it, the CDI part especially, which Podman's compat API does not take).
        ``disk_quota``: the store enforces a writable layer's size (``disk_quota()``)."""
        labels = {**spec.labels, LABEL_MANAGED: "1", LABEL_REF: spec.ref}
        host_config: dict[str, Any] = {
            # Its own empty namespace; start() moves the sandbox's veth in (module docstring).
            "NetworkMode": "none",
            "NanoCpus": spec.cpus_milli * 1_000_000,
            "Memory": spec.memory_mb * 1024 * 1024,
            # Equal to Memory: no swap on top, the limit the buyer paid for is the limit.
            "MemorySwap": spec.memory_mb * 1024 * 1024,
            "PidsLimit": spec.pids_limit,
            "Ulimits": [
                {"Name": name, "Soft": amount, "Hard": amount}
                for name, amount in self._ulimits.items()
            ],
            "Mounts": [
                {"Type": "bind", "Source": host, "Target": inside, "ReadOnly": True}
                for host, inside in spec.mounts.items()
            ],
        }
        if spec.dns:
            host_config["Dns"] = list(spec.dns)
        if spec.dns_search:
            host_config["DnsSearch"] = list(spec.dns_search)
        if disk_quota and spec.disk_gb > 0:
            # Refused by overlay2 on any store but XFS with prjquota: only when it takes it.
            host_config["StorageOpt"] = {"size": f"{spec.disk_gb}G"}
        if spec.cdi_devices:
            host_config["DeviceRequests"] = [{"Driver": "cdi", "DeviceIDs": list(spec.cdi_devices)}]
        body: dict[str, Any] = {
            "Image": spec.image,
            "Hostname": spec.name,
            "Labels": labels,
            "Env": [f"{key}={value}" for key, value in spec.env.items()],
            "HostConfig": host_config,
        }
        if spec.command:
            body["Cmd"] = list(spec.command)
        return body

    def start(self, spec: ContainerSpec) -> Container:
        body = self.create_body(spec, disk_quota=self.disk_quota().enforced)

        def launch() -> None:
            self._request("POST", f"/containers/create?name={_q(spec.name)}", body)
            self._request("POST", f"/containers/{_q(spec.name)}/start")

        def attach() -> None:
            info = self.inspect(spec.name)
            if spec.cdi_devices and not _took_cdi(info, spec.cdi_devices):
                # An engine that drops the request (Podman's compat API does) would hand the
                # buyer a sandbox without the GPUs paid for: fail instead.
                raise EngineError(
                    "the docker engine did not take the GPU request (CDI device requests "
                    "need Docker 25+ with CDI enabled)"
                )
            pid = int((info.get("State") or {}).get("Pid") or 0)
            if pid <= 0:
                raise EngineError(f"container {spec.name} is not running right after its start")
            join_netns(spec.netns, pid)

        return start_or_remove(self, spec.name, launch, attach, self._stopped_detail)

    def _stopped_detail(self, name: str) -> str:
        try:
            if (self.inspect(name).get("State") or {}).get("Running") is not False:
                return ""
        except EngineError:
            return ""
        return self.exit_detail(name)

    def containers(self) -> list[Container]:
        filters = urllib.parse.quote(json.dumps({"label": [LABEL_MANAGED]}))
        rows = self._json("GET", f"/containers/json?all=1&filters={filters}") or []
        found: list[Container] = []
        for row in rows:
            if LABEL_MANAGED not in (row.get("Labels") or {}):
                continue
            names = row.get("Names") or []
            found.append(Container.from_row(row, (names[0] if names else "").lstrip("/")))
        return found

    def remove(self, name: str) -> None:
        # force stops it first, v takes its anonymous volumes; the writable layer goes with
        # the container itself; a missing one (404) is fine.
        self._request("DELETE", f"/containers/{_q(name)}?force=1&v=1", ok=(200, 204, 404))

    # -- beyond the interface -----------------------------------------------------------------

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/containers/{_q(name)}/json") or {})

    def exposed_ports(self, image: str) -> tuple[int, ...]:
        """The TCP ports the image declares (EXPOSE), ssh's 22 left out."""
        info = self._json("GET", f"/images/{_q(image)}/json") or {}
        declared = (info.get("Config") or {}).get("ExposedPorts") or {}
        ports: set[int] = set()
        for key in declared:
            number, _, proto = str(key).partition("/")
            if (proto or "tcp") == "tcp" and number.isdigit() and 0 < int(number) < 65536:
                ports.add(int(number))
        ports.discard(22)
        return tuple(sorted(ports))[:32]

    def exit_detail(self, name: str) -> str:
        """Why a container stopped, for a buyer: its exit code, OOM kill, and its last log line."""
        try:
            state = self.inspect(name).get("State") or {}
        except EngineError:
            return "the container is gone"
        text = f"the container stopped (exit code {state.get('ExitCode')})"
        if state.get("OOMKilled"):
            text += ", killed for exceeding its memory limit"
        try:
            _, data = self._request("GET", f"/containers/{_q(name)}/logs?stdout=1&stderr=1&tail=3")
        except EngineError:
            return text
        last = _demux(data).strip().splitlines()
        if last:
            text += f": {last[-1][:200]}"
        return text


def _demux(data: bytes) -> str:
    """The text of a logs answer: without a TTY, frames of an 8-byte header (stream, 0, 0, 0,
    big-endian length) and that many bytes; anything else is taken as plain text."""
    out: list[bytes] = []
    rest = data
    while len(rest) >= 8 and rest[0] in (0, 1, 2) and rest[1:4] == b"\0\0\0":
        size = int.from_bytes(rest[4:8], "big")
        out.append(rest[8 : 8 + size])
        rest = rest[8 + size :]
    out.append(rest)
    return b"".join(out).decode(errors="replace")


def _took_cdi(info: Mapping[str, Any], devices: tuple[str, ...]) -> bool:
    """Whether the created container's HostConfig carries exactly ``devices`` as CDI requests."""
    requests = (info.get("HostConfig") or {}).get("DeviceRequests") or []
    taken = [
        device
        for request in requests
        if (request or {}).get("Driver") == "cdi"
        for device in (request.get("DeviceIDs") or [])
    ]
    return sorted(taken) == sorted(devices)


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _split_tag(image: str) -> tuple[str, str]:
    """The image's name and tag for the pull: a digest stays whole, no tag means latest."""
    if "@" in image:
        return image, ""
    head, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return head, tag
    return image, "latest"
