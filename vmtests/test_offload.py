"""Software flow offload carries real traffic: TCP and UDP, IPv4 and IPv6, routed and
masqueraded, both directions.

Each case proves its claim three ways: conntrack says [OFFLOAD] (both /proc/net/nf_conntrack
and ``conntrack -L``) while the flow is open, the classic path (forward-chain counter and
ip_forward) saw only a sliver of the packets, and the payload arrived byte-identical.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import traffic
from kmodtest.guest.rulesets import router_ruleset, sample_paths
from kmodtest.prepare.openwrt import OpenWrtImage

pytestmark = pytest.mark.per_nic

NBYTES = 2_000_000  # ~1400 full-size segments a way: the 1/20 criterion is unambiguous


@pytest.mark.parametrize("nat", [False, True], ids=["routed", "masquerade"])
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_flow_is_offloaded_and_payload_intact(router, host, endpoints, nft, proto, family, nat):
    applied = nft.apply(router_ruleset(nat=nat))
    assert applied.rc == 0, applied.stderr
    topo = router.topology
    openwrt = isinstance(router.image, OpenWrtImage)
    wan = topo.segments[1].router
    client_ip = topo.client.address(family)
    # masquerade rewrites the client to the router's wan address; the reply goes there
    reply_dst = wan.address(family) if nat else client_ip

    for direction in ("up", "down"):
        before = sample_paths(nft, family)
        with traffic.open_flow(endpoints, topo, proto, family, direction, NBYTES) as t:
            t.feed()
            t.wait_received()
            during = sample_paths(nft, family) - before
            proc = ct.the_entry(ct.proc_entries(host), proto, t.flow.port)
            # a stock OpenWrt image has no conntrack tool: /proc/net/nf_conntrack alone there
            tool = None if openwrt else ct.the_entry(ct.tool_entries(host), proto, t.flow.port)
            result = t.close()
        report = f"{t.flow}: {during}\n{proc.raw}\n{tool.raw if tool else '(no conntrack tool)'}"

        assert proc.offloaded, f"/proc shows no [OFFLOAD]: {report}{ct.state_report(host)}"
        if tool is not None:
            assert tool.offloaded, (
                f"conntrack -L shows no [OFFLOAD]: {report}{ct.state_report(host)}"
            )
        assert not proc.hw_offloaded, f"[HW_OFFLOAD] on an emulated NIC: {report}"
        assert (proc.orig.src, proc.reply.dst) == (client_ip, reply_dst), report
        assert during.mostly_offloaded(NBYTES), (
            f"classic path carried too much: {report}{ct.state_report(host)}"
        )
        assert result.intact, f"{result}\n{report}"


# masquerade above keeps the client's source port (nothing else holds it); here every port is
# translated, so the fast path must rewrite the reply's destination port back, too
NAT_PORTS = (20000, 20999)


def test_masquerade_to_a_port_range_rewrites_ports_both_ways(router, host, endpoints, nft):
    """IPv4 only: the port rewrite is the same code for both families."""
    low, high = NAT_PORTS
    assert nft.apply(router_ruleset(nat=True, nat_ports=f"{low}-{high}")).rc == 0
    for direction in ("up", "down"):
        with traffic.open_flow(endpoints, router.topology, "tcp", 4, direction, NBYTES) as t:
            t.feed()
            t.wait_received()
            proc = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
            result = t.close()
        report = f"{t.flow}\n{proc.raw}"
        assert proc.offloaded, f"/proc shows no [OFFLOAD]: {report}{ct.state_report(host)}"
        assert proc.reply.dport is not None and low <= proc.reply.dport <= high, (
            f"the client's port was not translated into {low}-{high}: {report}"
        )
        assert result.intact, f"{result}\n{report}"
