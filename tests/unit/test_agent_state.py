"""The agent's state directory (clawnode.state): private files, validated enrolment, status."""

from __future__ import annotations

import json
import stat

import clawnode.state
import pytest
from clawnode.keys import Identity
from clawnode.state import (
    AgentStatus,
    Enrollment,
    StateDir,
    StateError,
    append_private,
    normalize_gateway_url,
    validate_interface_name,
)

pytestmark = [pytest.mark.unit]


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def enrollment(**overrides) -> Enrollment:
    identity = Identity.generate()
    gateway = Identity.generate()
    fields = {
        "gateway": "https://molt.example",
        "node_id": identity.node_id,
        "name": "node-47",
        "mesh_address": "10.100.128.47",
        "gateway_public_key": gateway.public_key_b64,
        "websocket_url": "wss://molt.example/ws/agent/",
    }
    fields.update(overrides)
    return Enrollment(**fields)


def test_identity_is_created_once_with_mode_0600_in_a_0700_directory(tmp_path):
    state = StateDir(tmp_path / "var" / "clawnode")

    identity, created = state.load_or_create_identity()
    again, created_again = state.load_or_create_identity()

    assert created and not created_again
    assert again == identity
    assert mode(state.identity_path) == 0o600
    assert mode(state.path) == 0o700
    assert state.load_identity() == identity


def test_no_identity_yet_is_none_not_an_error(tmp_path):
    assert StateDir(tmp_path).load_identity() is None


def test_enrollment_round_trips_through_a_0600_file(tmp_path):
    state = StateDir(tmp_path / "state")
    saved = enrollment(interface="molt7", listen_port=51999, backend="userspace")

    state.save_enrollment(saved)

    assert state.load_enrollment() == saved
    assert mode(state.enrollment_path) == 0o600
    assert json.loads(state.enrollment_path.read_text())["name"] == "node-47"
    assert saved.interface_address == "10.100.128.47/17"


def test_enrollment_is_replaced_atomically_leaving_no_temporary_files(tmp_path):
    state = StateDir(tmp_path)
    state.save_enrollment(enrollment(name="node-1"))
    state.save_enrollment(enrollment(name="node-2"))

    assert state.load_enrollment().name == "node-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enrollment.json"]


def test_no_enrollment_yet_is_none(tmp_path):
    assert StateDir(tmp_path).load_enrollment() is None


def test_a_corrupt_enrollment_file_is_a_clear_error(tmp_path):
    state = StateDir(tmp_path)
    state.enrollment_path.write_text("{not json")

    with pytest.raises(StateError, match=r"enrollment\.json is not valid JSON"):
        state.load_enrollment()


def test_an_enrollment_file_with_a_bad_field_names_the_field(tmp_path):
    state = StateDir(tmp_path)
    data = enrollment().to_dict()
    data["mesh_address"] = "192.168.1.5"
    state.enrollment_path.write_text(json.dumps(data))

    with pytest.raises(StateError, match="mesh_address is outside the mesh network"):
        state.load_enrollment()


def test_an_enrollment_saved_before_job_network_existed_loads_with_the_plans_job_block(tmp_path):
    # enrollment.json of an agent enrolled before the job block: no job_network field. It must
    # still load, and route the block the gateway now hands job addresses out of.
    state = StateDir(tmp_path)
    data = enrollment().to_dict()
    del data["job_network"]
    state.enrollment_path.write_text(json.dumps(data))

    loaded = state.load_enrollment()

    assert loaded.job_network == clawnode.state.DEFAULT_JOB_NETWORK == "10.64.0.0/11"
    assert loaded.mesh_network == "10.100.128.0/17"
    assert loaded.interface_address == "10.100.128.47/17"


def test_the_job_network_round_trips_as_the_gateway_gave_it(tmp_path):
    state = StateDir(tmp_path)
    state.save_enrollment(enrollment(job_network="10.80.0.0/12"))

    assert state.load_enrollment().job_network == "10.80.0.0/12"
    assert json.loads(state.enrollment_path.read_text())["job_network"] == "10.80.0.0/12"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("job_network", "10.64.0.1/11", "job_network must be an IPv4 network"),
        ("job_network", "jobs", "job_network must be an IPv4 network"),
        ("job_network", "", "job_network must be a non-empty string"),
        ("job_network", "10.100.0.0/16", r"job_network overlaps the mesh network 10\.100\.128"),
        ("job_network", "10.100.200.0/24", "job_network overlaps the mesh network"),
        ("gateway", "ftp://molt.example", "http"),
        ("gateway", "https://molt.example/", "normalized"),
        ("node_id", "nd_XYZ", "node_id"),
        ("name", "node 47; rm -rf", "name"),
        ("gateway_public_key", "AAAA", "gateway_public_key"),
        ("websocket_url", "https://molt.example/ws/agent/", "ws://"),
        ("interface", "a-very-long-interface-name", "interface"),
        ("interface", "../etc", "interface"),
        ("listen_port", 0, "listen_port"),
        ("listen_port", True, "listen_port"),
        ("backend", "magic", "backend"),
    ],
)
def test_enrollment_refuses_invalid_values(field, value, words):
    with pytest.raises(StateError, match=words):
        enrollment(**{field: value})


def test_enrollment_from_dict_refuses_unknown_and_missing_fields():
    data = enrollment().to_dict()

    with pytest.raises(StateError, match="unknown fields: surprise"):
        Enrollment.from_dict({**data, "surprise": 1})
    del data["node_id"]
    with pytest.raises(StateError, match="node_id is required"):
        Enrollment.from_dict(data)


def test_gateway_urls_are_normalized_and_checked():
    assert normalize_gateway_url(" https://molt.example/ ") == "https://molt.example"
    assert normalize_gateway_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    for bad in ("molt.example", "https://", "https://u:p@molt.example", "https://m.example/?x=1"):
        with pytest.raises(StateError):
            normalize_gateway_url(bad)


def test_interface_names_follow_linux_rules():
    assert validate_interface_name("molt0") == "molt0"
    for bad in ("", "x" * 16, "a/b", "a b", ".", ".."):
        with pytest.raises(StateError):
            validate_interface_name(bad)


def test_daemon_status_round_trips_and_absent_status_is_none(tmp_path):
    state = StateDir(tmp_path)
    assert state.read_status() is None
    written = AgentStatus(state="connected", since=100, updated_at=110, pid=4242, revision=7)

    state.write_status(written)

    assert state.read_status() == written
    assert mode(state.status_path) == 0o600


def test_daemon_status_refuses_an_unknown_state():
    with pytest.raises(StateError, match="state must be one of"):
        AgentStatus(state="dancing", since=0, updated_at=0, pid=1)


def test_appends_are_private_and_a_failed_one_is_taken_back(tmp_path, monkeypatch):
    journal = tmp_path / "state" / "epochs.journal"
    append_private(journal, b"one 1\n")
    append_private(journal, b"two 2\n")
    assert journal.read_bytes() == b"one 1\ntwo 2\n"
    assert mode(journal) == 0o600 and mode(journal.parent) == 0o700

    real_write = clawnode.state.os.write
    writes = []

    def disk_fills_up(fd: int, data) -> int:
        if writes:
            raise OSError(28, "No space left on device")
        writes.append(1)
        return real_write(fd, bytes(data[:3]))  # part of the line, then the disk is full

    monkeypatch.setattr(clawnode.state.os, "write", disk_fills_up)
    with pytest.raises(OSError, match="No space"):
        append_private(journal, b"three 3\n")
    monkeypatch.undo()

    assert journal.read_bytes() == b"one 1\ntwo 2\n"  # no half line for the next to continue
    append_private(journal, b"four 4\n")
    assert journal.read_bytes().splitlines() == [b"one 1", b"two 2", b"four 4"]
