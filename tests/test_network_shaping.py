"""A flavor's vif limits on the host: the tap's htb class (what the guest receives) and the
out_limit element and limit object of the bridge table (what it sends) come with the plug,
survive a restart (reconciliation puts back what went missing) and the hypervisor's reset of
the tap's qdisc (``reshape``), reach ports plugged later and go with the unplug; ports without
limits get neither."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from network_fixtures import EGRESS_ALL, Lab, group, make_lab, port, run, sh, tables
from pyroute2 import IPRoute

from fastcompute.network import Network
from fastcompute.network.shaping import Shaping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="taps, tc and nftables need root")

LIMITED, FREE = "aaaaaaaa-0000-0000-0000-000000000001", "aaaaaaaa-0000-0000-0000-000000000002"
SHAPING = Shaping(inbound_average=300, inbound_peak=600, outbound_average=200, outbound_burst=50)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with make_lab() as made:
        made.net.shaping_of = lambda uuid: SHAPING if uuid == LIMITED else None
        yield made


def htb(tap: str) -> tuple[int, int] | None:
    """(rate, ceil) in bytes/s of the tap's htb class 1:1; None when the tap has no htb."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=tap)[0]
        for c in ipr.get_classes(index=index):
            if c.get_attr("TCA_KIND") == "htb" and c["handle"] == 0x10001:
                params = c.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS")
                return params["rate"], params["ceil"]
    return None


def out_limits(owner: str) -> dict[str, tuple[int, int]]:
    """tap -> (rate bytes/s, burst bytes) of its outbound limit, as the bridge table holds them."""
    objs = tables(owner).get("bridge", [])
    limits = {o["limit"]["name"]: o["limit"] for o in objs if "limit" in o}
    got = {}
    for o in objs:
        if "map" in o and o["map"]["name"] == "out_limit":
            for tap, name in o["map"].get("elem", []):
                lim = limits[name]
                assert lim["inv"] and lim["per"] == "second", lim
                got[tap] = (lim["rate"] * {"bytes": 1, "kbytes": 1024}[lim["rate_unit"]],
                            lim["burst"] * {"bytes": 1, "kbytes": 1024}[lim.get("burst_unit", "bytes")])
    assert set(limits) == {name for o in objs if "map" in o and o["map"]["name"] == "out_limit"
                           for _tap, name in o["map"].get("elem", [])}, "no limit object without its port"
    return got


def test_vif_limits_follow_the_ports_through_plug_restart_attach_and_unplug(lab: Lab) -> None:
    inbound = (300 * 1024, 600 * 1024)
    outbound = (200 * 1024, 50 * 1024)
    limited_ports = [port("10.0.0.1", groups=[group(EGRESS_ALL)]), port("10.0.0.2", security=False)]
    free_ports = [port("10.0.0.3", groups=[group(EGRESS_ALL)])]
    limited = run(lab.net.plug(LIMITED, limited_ports))
    free = run(lab.net.plug(FREE, free_ports))
    taps = [p.tap for p in limited]
    assert [htb(t) for t in taps] == [inbound, inbound], "port security or not"
    assert htb(free[0].tap) is None
    assert out_limits(lab.owner) == {t: outbound for t in taps}

    # A restart after damage behind the agent's back: one tap's class and one port's limit gone.
    sh("tc", "qdisc", "del", "dev", taps[0], "root")
    sh("nft", "delete", "element", "bridge", lab.owner, "out_limit", f"{{ {taps[1]} }}")
    lab.net.close()
    lab.net = Network(lab.cfg)
    lab.net.shaping_of = lambda uuid: SHAPING if uuid == LIMITED else None
    run(lab.net.reconcile({LIMITED: limited_ports, FREE: free_ports}))
    assert [htb(t) for t in taps] == [inbound, inbound]
    assert htb(free[0].tap) is None
    assert out_limits(lab.owner) == {t: outbound for t in taps}

    # What libvirt does to the taps of a guest it starts; the agent puts its limit back.
    sh("tc", "qdisc", "replace", "dev", taps[0], "root", "noqueue")
    assert htb(taps[0]) is None
    run(lab.net.reshape(LIMITED))
    run(lab.net.reshape(FREE))
    assert [htb(t) for t in taps] == [inbound, inbound]
    assert htb(free[0].tap) is None

    later = run(lab.net.plug(LIMITED, [*limited_ports, port("10.0.0.4", groups=[group(EGRESS_ALL)])]))
    taps = [p.tap for p in later]
    assert len(taps) == 3 and htb(taps[2]) == inbound
    assert out_limits(lab.owner) == {t: outbound for t in taps}

    run(lab.net.unplug(LIMITED))
    assert out_limits(lab.owner) == {}
    assert htb(free[0].tap) is None
    run(lab.net.unplug(FREE))
