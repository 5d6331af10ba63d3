"""The agent refuses plain http/ws to a gateway off this machine unless told --insecure, and a
gateway reached over TLS can never hand the agent channel over to plain text (issue 15 item 5):
whoever answers a plain-text join has their key pinned as the gateway's and from then on signs
this node's peers."""

from __future__ import annotations

import dataclasses

import pytest
from clawnode.cli import main
from clawnode.gateway_http import GatewayError, _parse_response
from clawnode.keys import Identity
from clawnode.state import StateError, check_transport

from tests.unit.test_agent_state import enrollment

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize(
    "url",
    [
        "http://gw.example",
        "http://192.0.2.7:8000",
        "ws://gw.example/ws/agent/",
        "http://[2001:db8::1]",
    ],
)
def test_plain_text_off_this_machine_is_refused_and_the_error_says_why(url):
    with pytest.raises(StateError, match=r"plain (http|ws).*--insecure"):
        check_transport(url, insecure=False)
    check_transport(url, insecure=True)  # the lab network the operator vouches for


@pytest.mark.parametrize(
    "url",
    [
        "https://gw.example",
        "wss://gw.example/ws/agent/",
        "http://127.0.0.1:8000",
        "http://127.9.9.9",
        "http://localhost:8000",
        "ws://[::1]:8000/ws/agent/",
    ],
)
def test_tls_or_loopback_needs_no_flag(url):
    check_transport(url, insecure=False)


def test_join_over_plain_http_to_another_machine_stops_before_anything_is_created(tmp_path, capsys):
    state_dir = tmp_path / "state"

    rc = main(
        ["join", "--gateway", "http://192.0.2.7", "--token", "t", "--state-dir", str(state_dir)]
    )

    assert rc == 1
    err = capsys.readouterr().err
    assert "is plain http" in err and "--insecure" in err
    assert not state_dir.exists()


def test_a_saved_enrolment_never_downgrades_an_https_gateway_to_ws():
    with pytest.raises(StateError, match="websocket_url must be wss://"):
        enrollment(websocket_url="ws://molt.example/ws/agent/")


def test_a_saved_plain_http_enrolment_off_this_machine_needs_its_insecure_mark():
    with pytest.raises(StateError, match="plain http"):
        enrollment(gateway="http://192.0.2.7", websocket_url="ws://192.0.2.7/ws/agent/")
    kept = enrollment(
        gateway="http://192.0.2.7", websocket_url="ws://192.0.2.7/ws/agent/", insecure=True
    )
    assert dataclasses.asdict(kept)["insecure"] is True


def test_an_enrolment_answer_that_downgrades_the_channel_is_refused():
    identity = Identity.generate()
    answer = {
        "node_id": identity.node_id,
        "name": "node-47",
        "mesh_address": "10.100.128.47",
        "gateway_public_key": Identity.generate().public_key_b64,
        "websocket_url": "ws://molt.example/ws/agent/",
    }

    with pytest.raises(GatewayError, match="downgrades the agent channel to ws://"):
        _parse_response(answer, "https://molt.example", identity)
    answer["websocket_url"] = "wss://molt.example/ws/agent/"
    assert _parse_response(answer, "https://molt.example", identity).websocket_url.startswith(
        "wss://"
    )


def test_the_enrolment_answer_tells_the_pinned_keys_place_in_the_chain_of_rotations():
    identity = Identity.generate()
    answer = {
        "node_id": identity.node_id,
        "name": "node-47",
        "mesh_address": "10.100.128.47",
        "gateway_public_key": Identity.generate().public_key_b64,
        "websocket_url": "wss://molt.example/ws/agent/",
    }
    # A gateway that predates the field: 0, the key is found in the chain by searching.
    assert _parse_response(answer, "https://molt.example", identity).gateway_key_sequence == 0
    answer["gateway_key_sequence"] = 2
    assert _parse_response(answer, "https://molt.example", identity).gateway_key_sequence == 2
    for bad in (-1, "2", True, 2.0, 2**53):
        answer["gateway_key_sequence"] = bad
        with pytest.raises(GatewayError, match="invalid gateway_key_sequence"):
            _parse_response(answer, "https://molt.example", identity)
