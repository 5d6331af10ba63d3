"""The Docker engine's requests, without a Docker daemon: the create body (limits, labels, the
CDI GPU request Podman's compat service cannot prove: tests/sandbox/test_docker.py), and its
answers to a stand-in Engine API on a unix socket (errors, a dropped GPU request)."""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler

import pytest
from clawnode.sandbox.docker import DockerEngine, _split_tag, _took_cdi
from clawnode.sandbox.engine import LABEL_MANAGED, LABEL_REF, ContainerSpec, EngineError

pytestmark = [pytest.mark.unit]


def spec(**extra) -> ContainerSpec:
    values = {
        "name": "molt-order-42",
        "ref": "order:42",
        "image": "docker.io/library/debian:12",
        "netns": "/var/run/netns/molt-order-42",
        "cdi_devices": ("nvidia.com/gpu=1", "nvidia.com/gpu=3"),
        "cpus_milli": 2500,
        "memory_mb": 4096,
        "pids_limit": 512,
        "disk_gb": 20,
        "mounts": {"/var/lib/clawnode/sshd/order-42": "/etc/molt-sshd"},
        "env": {"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"},
        "command": ("/usr/sbin/sshd", "-D"),
        "labels": {"molt.order": "42"},
    }
    values.update(extra)
    return ContainerSpec(**values)


def test_create_body_maps_every_feature_of_the_spec():
    engine = DockerEngine(host="unix:///nonexistent.sock", ulimits={"nofile": 20000})
    body = engine.create_body(spec())
    assert body == {
        "Image": "docker.io/library/debian:12",
        "Hostname": "molt-order-42",
        "Labels": {"molt.order": "42", LABEL_MANAGED: "1", LABEL_REF: "order:42"},
        "Env": ["NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b"],
        "Cmd": ["/usr/sbin/sshd", "-D"],
        "HostConfig": {
            "NetworkMode": "none",
            "NanoCpus": 2_500_000_000,
            "Memory": 4096 * 1024 * 1024,
            "MemorySwap": 4096 * 1024 * 1024,
            "PidsLimit": 512,
            "Ulimits": [{"Name": "nofile", "Soft": 20000, "Hard": 20000}],
            "Mounts": [
                {
                    "Type": "bind",
                    "Source": "/var/lib/clawnode/sshd/order-42",
                    "Target": "/etc/molt-sshd",
                    "ReadOnly": True,
                }
            ],
            # Docker 25+: CDI devices by their fully qualified names.
            "DeviceRequests": [
                {"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=1", "nvidia.com/gpu=3"]}
            ],
        },
    }
    # No GPUs: no device request at all.
    assert "DeviceRequests" not in engine.create_body(spec(cdi_devices=()))["HostConfig"]


def test_the_sandbox_resolves_names_through_the_agents_responder_when_given_one():
    engine = DockerEngine(host="unix:///nonexistent.sock")
    host = engine.create_body(spec(dns=("169.254.0.1",), dns_search=("molt",)))["HostConfig"]
    assert host["Dns"] == ["169.254.0.1"] and host["DnsSearch"] == ["molt"]
    assert "Dns" not in engine.create_body(spec())["HostConfig"]  # else the engine's default


def test_only_a_local_socket_is_accepted():
    with pytest.raises(ValueError, match="unix:///path"):
        DockerEngine(host="tcp://10.0.0.1:2375")


def test_the_default_host_is_docker_host_then_the_standard_socket(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/other.sock")
    assert DockerEngine()._socket == "/run/other.sock"
    monkeypatch.delenv("DOCKER_HOST")
    assert DockerEngine()._socket == "/var/run/docker.sock"


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("docker.io/library/debian:12", ("docker.io/library/debian", "12")),
        ("localhost:5000/molt/jupyter", ("localhost:5000/molt/jupyter", "latest")),
        ("debian", ("debian", "latest")),
        ("debian@sha256:abc", ("debian@sha256:abc", "")),
    ],
)
def test_an_image_splits_into_name_and_tag_for_the_pull(image, parts):
    assert _split_tag(image) == parts


class _Api(BaseHTTPRequestHandler):
    """A stand-in Engine API: records each request, answers from the server's table."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.seen.append((self.command, self.path, body))  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        status, reply = self.server.table.get(  # type: ignore[attr-defined]
            (self.command, path), (404, {"message": "no such container"})
        )
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def api(tmp_path):
    path = tmp_path / "docker.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), _Api)
    server.seen, server.table = [], {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, DockerEngine(host=f"unix://{path}", timeout=10)
    server.shutdown()
    server.server_close()


def test_an_engine_that_drops_the_gpu_request_fails_the_start_and_removes_it(api):
    server, engine = api
    name = "/v1.41/containers/molt-order-42"
    server.table = {
        ("POST", "/v1.41/containers/create"): (201, {"Id": "abc"}),
        ("POST", f"{name}/start"): (204, {}),
        # What Podman 4.3's compat service reports: no device requests kept.
        ("GET", f"{name}/json"): (200, {"State": {"Running": True, "Pid": 4242}, "HostConfig": {}}),
        ("DELETE", name): (204, {}),
    }
    with pytest.raises(EngineError, match="did not take the GPU request"):
        engine.start(spec())
    assert [(method, path.split("?")[0]) for method, path, _ in server.seen] == [
        ("GET", "/v1.41/info"),  # once: does the store take a disk limit? (unanswered: no)
        ("POST", "/v1.41/containers/create"),
        ("POST", f"{name}/start"),
        ("GET", f"{name}/json"),
        ("GET", f"{name}/json"),  # still running? (else the start says why it stopped)
        ("DELETE", name),
    ]
    assert server.seen[-1][1].endswith("?force=1&v=1")


def test_the_engines_own_message_comes_back_and_a_missing_container_is_fine(api):
    server, engine = api
    server.table = {
        ("POST", "/v1.41/containers/create"): (404, {"message": "No such image: debian:12"}),
    }
    with pytest.raises(EngineError) as failure:
        engine.start(spec())
    assert str(failure.value) == ("docker POST /containers/create failed: No such image: debian:12")
    engine.remove("molt-order-42")  # 404: already gone, fine


def test_an_absent_socket_says_so(tmp_path):
    engine = DockerEngine(host=f"unix://{tmp_path}/none.sock")
    with pytest.raises(EngineError, match="does not exist"):
        engine.containers()


def test_a_quota_store_gets_the_jobs_disk_as_storage_opt(api, tmp_path, monkeypatch):
    from clawnode.sandbox import quota

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/loop3 /srv/docker xfs rw,relatime,prjquota 0 0\n")
    monkeypatch.setattr(quota, "MOUNTS", mounts)
    server, engine = api
    server.table = {
        ("GET", "/v1.41/info"): (
            200,
            {
                "Driver": "overlay2",
                "DockerRootDir": "/srv/docker",
                "DriverStatus": [["Backing Filesystem", "xfs"]],
            },
        ),
        ("POST", "/v1.41/containers/create"): (404, {"message": "No such image: debian:12"}),
    }
    for _ in range(2):
        with pytest.raises(EngineError):
            engine.start(spec())
    creates = [body for _, path, body in server.seen if "/containers/create" in path]
    assert [body["HostConfig"]["StorageOpt"] for body in creates] == [{"size": "20G"}] * 2
    assert [path for _, path, _ in server.seen].count("/v1.41/info") == 1  # asked once
    assert "StorageOpt" not in engine.create_body(spec())["HostConfig"]


def test_a_disk_quota_store_gets_storage_opt_for_any_disk_of_a_gigabyte_or_more_never_for_none():
    engine = DockerEngine(host="unix:///nonexistent.sock")
    one = engine.create_body(spec(disk_gb=1), disk_quota=True)["HostConfig"]
    assert one["StorageOpt"] == {"size": "1G"}
    # 0: no limit asked (size=0G would be a zero-byte layer, or a refusal).
    assert "StorageOpt" not in engine.create_body(spec(disk_gb=0), disk_quota=True)["HostConfig"]


def test_the_gpu_check_passes_only_a_container_holding_exactly_the_requested_cdi_devices():
    """_took_cdi guards "exactly the GPUs paid for" after the create: an engine that dropped,
    cut or widened the request fails the start (the test of an engine that drops the request
    covers only an empty answer)."""
    asked = ("nvidia.com/gpu=1", "nvidia.com/gpu=3")

    def info(*requests):
        return {"HostConfig": {"DeviceRequests": list(requests)}}

    def cdi(*ids):
        return {"Driver": "cdi", "DeviceIDs": list(ids)}

    assert _took_cdi(info(cdi("nvidia.com/gpu=3", "nvidia.com/gpu=1")), asked)  # any order
    assert _took_cdi(info(cdi("nvidia.com/gpu=1"), cdi("nvidia.com/gpu=3")), asked)  # split
    assert not _took_cdi(info(cdi("nvidia.com/gpu=1")), asked)  # one missing
    assert not _took_cdi(info(cdi(*asked, "nvidia.com/gpu=0")), asked)  # one more
    assert not _took_cdi(info({"Driver": "nvidia", "DeviceIDs": list(asked)}), asked)  # not CDI
    # Missing or null parts of the answer are "took nothing", never an error.
    assert not _took_cdi({}, asked)
    assert not _took_cdi({"HostConfig": None}, asked)
    assert not _took_cdi({"HostConfig": {"DeviceRequests": None}}, asked)
    assert not _took_cdi(info(None, {"Driver": "cdi", "DeviceIDs": None}), asked)
    assert _took_cdi(info(None, {"Driver": "cdi", "DeviceIDs": None}, cdi(*asked)), asked)
