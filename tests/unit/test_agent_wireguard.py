"""WireGuard backend pieces that need no interface: key encodings, the UAPI reply parser, the
kernel dump merger (on real pyroute2 messages), the backend chooser and the in-memory backend.

The backends themselves run against real wireguard-go in tests/netns/.
"""

from __future__ import annotations

import base64
import errno
import socket

import pytest
from clawnode.backends.base import PeerStatus, resolve_endpoint
from clawnode.backends.choose import choose_backend
from clawnode.backends.errors import WireGuardError
from clawnode.backends.kernel import KernelBackend
from clawnode.backends.links import kernel_wireguard_available
from clawnode.backends.memory import FakeBackend
from clawnode.backends.netlink import netlink_peer, peers_from_netlink_dump
from clawnode.backends.uapi import hex_to_key, key_to_hex, parse_uapi_get
from clawnode.backends.userspace import UserspaceBackend
from clawnode.keys import encode_key, generate_wireguard_keypair
from pyroute2.netlink.generic.wireguard import WG_CMD_GET_DEVICE, wgmsg

pytestmark = [pytest.mark.unit]


def key() -> str:
    return encode_key(generate_wireguard_keypair()[1])


# -- key encodings ------------------------------------------------------------------------------


def test_uapi_keys_are_the_same_32_bytes_as_64_hex_characters():
    public = key()

    text = key_to_hex(public)

    assert len(text) == 64 and text == text.lower()
    assert bytes.fromhex(text) == base64.b64decode(public)
    assert hex_to_key(text) == public


def test_bad_keys_are_refused_before_they_reach_a_socket():
    with pytest.raises(ValueError):
        key_to_hex("not a key")
    with pytest.raises(WireGuardError):
        hex_to_key("zz" * 32)
    with pytest.raises(WireGuardError):
        hex_to_key("ab" * 31)


def test_kernel_peer_request_replaces_only_this_peers_allowed_ips():
    public = key()

    peer = netlink_peer(public, ["10.100.128.9/32"], "203.0.113.2:51820", 25)

    assert peer == {
        "public_key": public,
        "allowed_ips": ["10.100.128.9/32"],
        "replace_allowed_ips": True,
        "persistent_keepalive": 25,
        "endpoint_addr": "203.0.113.2",
        "endpoint_port": 51820,
    }
    # pyroute2 encodes keys from base64 to raw bytes on the wire.
    assert len(base64.b64decode(peer["public_key"])) == 32


@pytest.mark.parametrize(
    ("allowed", "endpoint", "keepalive"),
    [
        (["10.100.128.9/33"], "", 0),
        (["10.100.128.9/24"], "", 0),  # host bits set
        ("10.100.128.9/32", "", 0),  # a string, not a list
        (["10.100.128.9/32"], "203.0.113.2", 0),
        (["10.100.128.9/32"], "", 70000),
        (["10.100.128.9/32\nremove=true"], "", 0),  # a smuggled UAPI line
    ],
)
def test_peer_values_are_validated_before_use(allowed, endpoint, keepalive):
    with pytest.raises(WireGuardError):
        netlink_peer(key(), allowed, endpoint, keepalive)


def test_endpoints_resolve_to_ip_literals():
    assert resolve_endpoint("203.0.113.2:51820") == ("203.0.113.2", 51820)
    assert resolve_endpoint("[2001:db8::1]:51820") == ("2001:db8::1", 51820)
    assert resolve_endpoint("localhost:51820")[1] == 51820
    assert socket.inet_pton(socket.AF_INET, resolve_endpoint("localhost:1")[0])


# -- the UAPI get reply -------------------------------------------------------------------------


def test_uapi_get_reply_is_parsed_into_device_fields_and_peers():
    one, two = key(), key()
    reply = "\n".join(
        [
            "private_key=" + "11" * 32,
            "listen_port=51820",
            f"public_key={key_to_hex(one)}",
            "preshared_key=" + "00" * 32,
            "protocol_version=1",
            "endpoint=203.0.113.2:43122",
            "last_handshake_time_sec=1700000100",
            "last_handshake_time_nsec=5",
            "tx_bytes=1184",
            "rx_bytes=1532",
            "persistent_keepalive_interval=25",
            "allowed_ip=10.200.3.0/24",
            "allowed_ip=10.100.128.9/32",
            f"public_key={key_to_hex(two)}",
            "protocol_version=1",
            "last_handshake_time_sec=0",
            "tx_bytes=0",
            "rx_bytes=0",
            "persistent_keepalive_interval=0",
            "allowed_ip=10.100.128.10/32",
        ]
    )

    device, peers = parse_uapi_get(reply)

    assert device == {"private_key": "11" * 32, "listen_port": "51820"}
    assert peers[one] == PeerStatus(
        public_key=one,
        allowed_ips=("10.100.128.9/32", "10.200.3.0/24"),
        endpoint="203.0.113.2:43122",
        rx_bytes=1532,
        tx_bytes=1184,
        last_handshake=1700000100,
        persistent_keepalive=25,
    )
    assert peers[two] == PeerStatus(public_key=two, allowed_ips=("10.100.128.10/32",))


def test_a_peer_with_no_allowed_ips_is_still_listed():
    public = key()

    _device, peers = parse_uapi_get(f"listen_port=1\npublic_key={key_to_hex(public)}\n")

    assert peers[public].allowed_ips == ()


def test_a_malformed_uapi_line_is_an_error():
    with pytest.raises(WireGuardError, match="unexpected UAPI line"):
        parse_uapi_get("listen_port=1\ngarbage\n")


# -- the kernel's multi-part dump, on messages pyroute2 itself encodes and decodes ---------------


def netlink_message(peers: list[dict]) -> wgmsg:
    """A WG_CMD_GET_DEVICE reply part as the kernel sends it, decoded by pyroute2."""
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "molt0"])
    msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", 51820])
    encoded = []
    for peer in peers:
        attrs = [["WGPEER_A_PUBLIC_KEY", peer["key"]]]
        if "rx" in peer:
            attrs += [
                ["WGPEER_A_RX_BYTES", peer["rx"]],
                ["WGPEER_A_TX_BYTES", peer["tx"]],
                ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.get("keepalive", 0)],
                [
                    "WGPEER_A_LAST_HANDSHAKE_TIME",
                    {"tv_sec": peer.get("handshake", 0), "tv_nsec": 0},
                ],
            ]
        if "endpoint" in peer:
            addr, port = peer["endpoint"]
            attrs.append(["WGPEER_A_ENDPOINT", {"addr": addr, "port": port}])
        ips = []
        for cidr in peer.get("ips", []):
            addr, mask = cidr.split("/")
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            ips.append(
                {
                    "attrs": [
                        ["WGALLOWEDIP_A_FAMILY", family],
                        ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, addr)],
                        ["WGALLOWEDIP_A_CIDR_MASK", int(mask)],
                    ]
                }
            )
        attrs.append(["WGPEER_A_ALLOWEDIPS", ips])
        encoded.append({"attrs": attrs})
    msg["attrs"].append(["WGDEVICE_A_PEERS", encoded])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_every_part_of_a_dump_is_read_and_a_split_peer_is_merged():
    one, two, three = key(), key(), key()
    parts = [
        netlink_message(
            [
                {
                    "key": one,
                    "rx": 10,
                    "tx": 20,
                    "ips": ["10.100.128.9/32"],
                    "handshake": 1700000000,
                },
                {
                    "key": two,
                    "rx": 30,
                    "tx": 40,
                    "keepalive": 25,
                    "endpoint": ("203.0.113.2", 43122),
                    "ips": ["10.100.128.10/32", "10.200.1.0/24"],
                },
            ]
        ),
        # The kernel continues a peer whose allowed IPs did not fit: same key, more IPs, and no
        # counters in the continuation.
        netlink_message([{"key": two, "ips": ["10.200.2.0/24", "fd00::/64"]}]),
        netlink_message([{"key": three, "rx": 0, "tx": 0, "ips": []}]),
    ]

    peers = peers_from_netlink_dump(parts)

    assert sorted(peers) == sorted([one, two, three])
    assert peers[one] == PeerStatus(
        public_key=one,
        allowed_ips=("10.100.128.9/32",),
        rx_bytes=10,
        tx_bytes=20,
        last_handshake=1700000000,
    )
    assert peers[two] == PeerStatus(
        public_key=two,
        allowed_ips=("10.100.128.10/32", "10.200.1.0/24", "10.200.2.0/24", "fd00::/64"),
        endpoint="203.0.113.2:43122",
        rx_bytes=30,
        tx_bytes=40,
        persistent_keepalive=25,
    )
    assert peers[three].allowed_ips == ()


def test_an_empty_dump_has_no_peers():
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "molt0"])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()

    assert peers_from_netlink_dump([decoded]) == {}


# -- choosing a backend -------------------------------------------------------------------------


def has(*tools):
    return lambda name: f"/usr/bin/{name}" if name in tools else None


def test_auto_picks_the_kernel_when_it_has_wireguard():
    cls, reason = choose_backend(
        "auto", kernel_probe=lambda: (True, "kernel has it"), which=has("wireguard-go")
    )

    assert cls is KernelBackend
    assert "kernel has it" in reason


def test_auto_falls_back_to_wireguard_go_and_says_why():
    cls, reason = choose_backend(
        "auto", kernel_probe=lambda: (False, "no module"), which=has("wireguard-go")
    )

    assert cls is UserspaceBackend
    assert reason == "userspace: wireguard-go, because no module"


def test_auto_with_neither_is_a_clear_error():
    with pytest.raises(WireGuardError, match="wireguard-go is not on PATH"):
        choose_backend("auto", kernel_probe=lambda: (False, "no module"), which=has())


def test_an_explicit_kernel_choice_fails_where_the_kernel_lacks_wireguard():
    with pytest.raises(
        WireGuardError, match="--backend kernel cannot work here: no module"
    ) as info:
        choose_backend(
            "kernel", kernel_probe=lambda: (False, "no module"), which=has("wireguard-go")
        )

    assert info.value.errno == errno.EOPNOTSUPP


def test_an_explicit_userspace_choice_needs_wireguard_go():
    assert choose_backend("userspace", which=has("wireguard-go"))[0] is UserspaceBackend
    with pytest.raises(WireGuardError, match="needs wireguard-go"):
        choose_backend("userspace", which=has())


def test_auto_on_this_machine_follows_the_kernels_real_capability():
    available, why = kernel_wireguard_available()

    cls, reason = choose_backend("auto")

    if available:
        assert cls is KernelBackend
    else:
        # testing.md: these machines' kernels have no WireGuard module.
        assert cls is UserspaceBackend
        assert "the kernel has no WireGuard" in reason
    assert why in reason


def test_unknown_backend_names_are_refused():
    with pytest.raises(WireGuardError, match="auto, kernel or userspace"):
        choose_backend("magic")


# -- the in-memory backend ----------------------------------------------------------------------


def test_fake_backend_updates_in_place_and_moves_a_taken_network_like_wireguard():
    one, two = key(), key()
    backend = FakeBackend()
    backend.ensure_interface("molt0", b"\x02" * 32, 51820, "10.100.128.1/17")
    backend.set_peer(one, ["10.100.128.9/32", "10.200.1.0/24"])
    backend.add_traffic(one, rx=100, tx=200, handshake_at=1700000000)

    backend.set_peer(one, ["10.100.128.9/32", "10.200.1.0/24"], keepalive=25)
    backend.set_peer(two, ["10.200.1.0/24"])

    peers = backend.list_peers()
    assert peers[one].allowed_ips == ("10.100.128.9/32",)
    assert (peers[one].rx_bytes, peers[one].tx_bytes, peers[one].persistent_keepalive) == (
        100,
        200,
        25,
    )
    assert peers[two].allowed_ips == ("10.200.1.0/24",)
    backend.remove_peer(one)
    assert list(backend.list_peers()) == [two]


def test_fake_backend_needs_its_interface():
    backend = FakeBackend()

    with pytest.raises(WireGuardError) as info:
        backend.list_peers()

    assert info.value.errno == errno.ENODEV
    assert not backend.interface_exists()


def test_a_backend_manages_one_interface_name():
    backend = FakeBackend()
    backend.ensure_interface("molt0", b"\x02" * 32, 51820, "10.100.128.1/17")

    with pytest.raises(WireGuardError, match="manages molt0"):
        backend.ensure_interface("molt1", b"\x02" * 32, 51820, "10.100.128.1/17")
    with pytest.raises(WireGuardError, match="CIDR"):
        FakeBackend().ensure_interface("molt0", b"\x02" * 32, 51820, "10.100.128.1")
    with pytest.raises(WireGuardError, match="1-15"):
        FakeBackend().ensure_interface("a-name-that-is-too-long", b"\x02" * 32, 1, "10.0.0.1/8")
    # A route onto the interface must be a network (the job block), never a host address.
    with pytest.raises(WireGuardError, match=r"route '10\.64\.0\.1/11' is not an IPv4 network"):
        FakeBackend().ensure_interface(
            "molt0", b"\x02" * 32, 51820, "10.100.128.1/17", routes=("10.64.0.1/11",)
        )
