"""When the agent sets a peer's endpoint again, and what it hands the device (clawnode.reconcile).

A desired endpoint is set when the device knows none, knows one it cannot read, or knows another
port or address; a host name is not resolved by the plan, so with the same port it is left as
the device has it. apply() passes the endpoint on, and a device error with no message is still
reported with what it was.
"""

from __future__ import annotations

import pytest
from clawnode.backends.base import PeerStatus
from clawnode.backends.memory import FakeBackend
from clawnode.keys import encode_key, generate_wireguard_keypair
from clawnode.reconcile import Add, Update, apply, plan
from clawnode.wire import DesiredState, PeerSpec

pytestmark = [pytest.mark.unit]

NODE_ID = "nd_" + "ab" * 16
NETWORK = "10.100.128.11/32"
A = encode_key(generate_wireguard_keypair()[1])


def plan_for(desired_endpoint: str, actual_endpoint: str) -> list[object]:
    spec = PeerSpec(
        public_key=A, allowed_ips=(NETWORK,), kind="job", ref="order-1", endpoint=desired_endpoint
    )
    desired = DesiredState(node_id=NODE_ID, revision=1, peers=(spec,), issued_at=1_700_000_000)
    actual = {A: PeerStatus(public_key=A, allowed_ips=(NETWORK,), endpoint=actual_endpoint)}
    return plan(desired, actual)


def endpoint_update(endpoint: str) -> list[object]:
    return [Update(A, (NETWORK,), endpoint=endpoint, changed=("endpoint",))]


def test_a_desired_endpoint_is_set_when_the_device_has_none_yet():
    assert plan_for("198.51.100.8:51820", "") == endpoint_update("198.51.100.8:51820")


def test_a_desired_endpoint_is_set_over_one_the_device_reports_unreadably():
    assert plan_for("198.51.100.8:51820", "not an endpoint") == endpoint_update(
        "198.51.100.8:51820"
    )


def test_the_same_address_on_another_port_is_set_again():
    assert plan_for("198.51.100.8:51820", "198.51.100.8:51821") == endpoint_update(
        "198.51.100.8:51820"
    )


def test_a_host_name_on_the_right_port_is_left_as_the_device_resolved_it():
    assert plan_for("gw.example.net:51820", "198.51.100.8:51820") == []


def test_apply_hands_the_endpoint_and_keepalive_to_the_device():
    backend = FakeBackend()
    backend.ensure_interface("molt0", b"\x01" * 32, 51820, "10.100.128.1/32")

    results = apply(backend, [Add(A, (NETWORK,), endpoint="198.51.100.8:51820", keepalive=25)])

    assert results == {A: "ok"}
    assert backend.peers[A].endpoint == "198.51.100.8:51820"
    assert backend.peers[A].persistent_keepalive == 25


class Recording(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.sets: list[tuple[str, int]] = []

    def set_peer(self, public_key, allowed_ips, endpoint="", keepalive=0) -> None:
        self.sets.append((endpoint, keepalive))
        super().set_peer(public_key, allowed_ips, endpoint=endpoint, keepalive=keepalive)


def test_a_moved_endpoint_of_a_peer_with_keepalive_is_sent_to_at_once():
    """WireGuard sends a keepalive at once only when keepalive goes from 0 to on: a moved
    endpoint is set with keepalive 0, then with its own, so the new path gets a packet now, not
    after the other side's next packet through the old one moved the peer back."""
    backend = Recording()
    backend.ensure_interface("molt0", b"\x01" * 32, 51820, "10.100.128.1/32")
    apply(backend, [Add(A, (NETWORK,), endpoint="192.0.2.30:40001", keepalive=25)])
    backend.sets.clear()

    moved = Update(A, (NETWORK,), "198.51.100.7:51820", 25, changed=("endpoint",))
    assert apply(backend, [moved]) == {A: "ok"}

    assert backend.sets == [("198.51.100.7:51820", 0), ("198.51.100.7:51820", 25)]
    assert backend.peers[A].endpoint == "198.51.100.7:51820"
    assert backend.peers[A].persistent_keepalive == 25


def test_other_changes_are_one_set():
    backend = Recording()
    backend.ensure_interface("molt0", b"\x01" * 32, 51820, "10.100.128.1/32")
    changes = [
        # Keepalive turned on with the endpoint: WireGuard sends at once anyway.
        Update(A, (NETWORK,), "192.0.2.30:40001", 25, changed=("endpoint", "keepalive")),
        # No keepalive: nothing to send.
        Update(A, (NETWORK,), "192.0.2.30:40003", 0, changed=("endpoint",)),
        # The endpoint stays.
        Update(A, ("10.100.128.12/32",), "", 25, changed=("allowed_ips",)),
    ]
    for change in changes:
        backend.sets.clear()
        apply(backend, [change])
        assert backend.sets == [(change.endpoint, change.keepalive)], change


class SilentFailure(FakeBackend):
    def set_peer(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError()


def test_a_device_error_without_a_message_is_reported_by_its_type():
    backend = SilentFailure()
    backend.ensure_interface("molt0", b"\x01" * 32, 51820, "10.100.128.1/32")

    assert apply(backend, [Add(A, (NETWORK,))]) == {A: "error: RuntimeError()"}
