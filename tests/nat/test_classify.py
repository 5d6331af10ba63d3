"""The lab proves itself with real packets before anything of MOLT runs in it.

For each kind, like a STUN client: from behind the NAT, one local port probes two observers
(different addresses, and a second port of the first) and compares the public mappings they saw
(the same: endpoint-independent mapping; different: endpoint-dependent); another local port,
after contacting one observer, receives or not the unsolicited packets the observers send from
its other port and its other address (the filtering). Each kind must behave as its RFC 4787
name says. Hairpinning: two hosts behind one NAT reach each other at their public mappings.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from tests.nat import lab as nat_lab
from tests.nat import tunnel
from tests.nat.conftest import PROBE

pytestmark = [pytest.mark.nat]

EXPECTED_RECEIVED = {
    nat_lab.EIF: ["addr", "port", "same"],
    nat_lab.ADF: ["port", "same"],
    nat_lab.APDF: ["same"],
}


def _probe(lab: nat_lab.Lab, host: nat_lab.Host, *args: str) -> dict:
    result = lab.exec(host.ns, sys.executable, PROBE, *args, timeout=30)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", nat_lab.KINDS, ids=lambda kind: kind.name)
def test_kind_behaves_as_named(lab, kind):
    (host,) = lab.site(kind, nat_lab.PROVIDER_NET, ["h"])
    try:
        seen = _probe(lab, host, "classify", nat_lab.OBSERVER_A, nat_lab.OBSERVER_B)
    finally:
        lab.release_sites()
    mappings = seen["mapping"]
    addresses = {mapping.rpartition(":")[0] for mapping in mappings.values()}
    # Every observer sees the site's public address: the host's own when public, the outermost
    # NAT's otherwise (so the packets really went through every NAT of the kind).
    assert addresses == {host.public_ip}, seen
    assert (host.address == host.public_ip) is kind.public
    distinct = len(set(mappings.values()))
    if kind.mapping is nat_lab.EIM:
        assert distinct == 1, f"{kind.name}: mapping depends on the endpoint: {mappings}"
    else:
        assert distinct == 3, f"{kind.name}: mapping does not depend on the endpoint: {mappings}"
    assert seen["received"] == EXPECTED_RECEIVED[kind.filtering], (
        f"{kind.name}: expected {kind.filtering.label} filtering, received {seen['received']}"
    )


def test_hairpin(lab):
    """Two hosts behind one hairpinning NAT reach each other at their public mappings, and each
    sees the other's public mapping as the source (RFC 4787 REQ-9), as an outside peer would."""
    one, two = lab.site(nat_lab.HAIRPIN_SITE, nat_lab.PROVIDER_NET, ["a", "b"])
    try:
        first = _probe(lab, one, "stun", "40001", nat_lab.OBSERVER_A)["mapping"]
        second = _probe(lab, two, "stun", "40002", nat_lab.OBSERVER_A)["mapping"]
        assert first == f"{one.public_ip}:40001" and second == f"{two.public_ip}:40002"
        # One after the other: two hairpinned flows created in the same instant race in
        # conntrack, and Linux resolves the clash by giving the second a random port (seen once
        # in CI: 51516 for 40002). That race is the kernel's, not the NAT kind's.
        procs = [lab.popen(one.ns, [sys.executable, PROBE, "punch", "40001", second], stdout=-1)]
        time.sleep(0.3)
        procs.append(lab.popen(two.ns, [sys.executable, PROBE, "punch", "40002", first], stdout=-1))
        heard = [json.loads(proc.communicate(timeout=30)[0])["heard_from"] for proc in procs]
    finally:
        lab.release_sites()
    assert heard == [second, first]


def test_punch_without_hairpin_fails(lab):
    """The same exchange behind a NAT that does not hairpin never arrives: the hairpin test
    above can fail."""
    kind = nat_lab.Kind("no-hairpin", (nat_lab.PORT_RESTRICTED,))
    one, two = lab.site(kind, nat_lab.PROVIDER_NET, ["a", "b"])
    try:
        first = _probe(lab, one, "stun", "40001", nat_lab.OBSERVER_A)["mapping"]
        second = _probe(lab, two, "stun", "40002", nat_lab.OBSERVER_A)["mapping"]
        # One after the other: two hairpinned flows created in the same instant race in
        # conntrack, and Linux resolves the clash by giving the second a random port (seen once
        # in CI: 51516 for 40002). That race is the kernel's, not the NAT kind's.
        procs = [lab.popen(one.ns, [sys.executable, PROBE, "punch", "40001", second], stdout=-1)]
        time.sleep(0.3)
        procs.append(lab.popen(two.ns, [sys.executable, PROBE, "punch", "40002", first], stdout=-1))
        heard = [json.loads(proc.communicate(timeout=30)[0])["heard_from"] for proc in procs]
    finally:
        lab.release_sites()
    assert heard == [None, None]


def test_lab_leaves_nothing_behind_even_when_a_test_fails():
    """Namespaces, processes and wireguard-go's UAPI sockets go when the lab exits by an error."""
    made: list[str] = []
    sockets: list[str] = []
    with pytest.raises(RuntimeError, match="a failing test"), nat_lab.nat_lab() as own_lab:
        kind = nat_lab.KINDS_BY_NAME["double"]
        (host,) = own_lab.site(kind, nat_lab.PROVIDER_NET, ["h"])
        tunnel.start_wireguard(own_lab, host.ns, "h", 51820, None)
        made = list(own_lab.namespaces)
        sockets = [f"/var/run/wireguard/{name}.sock" for name in own_lab.wireguard_interfaces]
        assert all(os.path.exists(path) for path in sockets)
        raise RuntimeError("a failing test")
    assert len(made) == 5  # internet, services, two routers, the host
    left = nat_lab.run("ip", "netns", "list").stdout
    assert not [ns for ns in made if ns in left.split()], left
    assert not [path for path in sockets if os.path.exists(path)]
