"""What the fast path puts on the wire, read at the far end: like any router, it leaves the
TTL (IPv4) or hop limit (IPv6) one lower, and a packet whose TTL runs out at the router is not
forwarded at all: the flowtable leaves it to the classic path, which drops it, counts it and
answers ICMP time exceeded (traceroute through an offloaded flow depends on that). IPv4
fragments are not for the fast path either (only the first one carries the ports): the
classic path reassembles them, and the datagram must arrive whole.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import links, traffic, wire
from kmodtest.guest.rulesets import router_ruleset, sample_paths

pytestmark = pytest.mark.per_nic

NBYTES = 1_000_000
SENT_TTL = 64  # the client's default TTL / hop limit (net.ipv4.ip_default_ttl, hop_limit)
EXPIRING = 8  # datagrams the client sends down the offloaded flow with TTL 1


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_fast_path_decrements_ttl_and_leaves_expiring_packets_to_the_classic_path(
    router, host, endpoints, nft, family
):
    assert nft.apply(router_ruleset()).rc == 0
    hop = wire.HOP_FIELD[family]
    total = NBYTES + EXPIRING * traffic.UDP_PAYLOAD
    topo = router.topology
    with traffic.open_flow(endpoints, topo, "udp", family, "up", total) as t:
        flow = f"udp dport {t.flow.port}"
        left = SENT_TTL - 1
        meter = {"decremented": f"{flow} {hop} {left}", "other": f"{flow} {hop} != {left}"}
        with wire.ingress_meter(endpoints, topo.server.netns, topo.server.name, meter) as arrived:
            before = sample_paths(nft, family)
            t.feed(NBYTES)
            t.wait_received()
            during = sample_paths(nft, family) - before
            entry = ct.the_entry(ct.proc_entries(host), "udp", t.flow.port)
            on_wire = arrived()

            # the same flow, its packets now sent with TTL 1: none may reach the server
            received = t.received()
            expired_before = traffic.expired_in_transit(host, family)
            with wire.rewrite_sent(endpoints, topo.client.netns, flow, f"{hop} set 1") as rewritten:
                t.feed(EXPIRING * traffic.UDP_PAYLOAD)
                sent = wire.poll_count(rewritten, EXPIRING)
                expired = wire.poll_count(
                    lambda: traffic.expired_in_transit(host, family) - expired_before, sent
                )
            late = arrived()
            received_late = t.received() - received

    report = f"{t.flow}: {during}\n{entry.raw}"
    assert entry.offloaded and during.mostly_offloaded(NBYTES), (
        f"not offloaded, so this says nothing about the fast path: {report}"
    )
    assert on_wire["decremented"] > 0 and on_wire["other"] == 0, (
        f"sent with {hop} {SENT_TTL}, the server saw {on_wire['decremented']} packets with "
        f"{SENT_TTL - 1} and {on_wire['other']} with another value: {report}"
    )
    assert expired == sent, (
        f"the client sent {sent} datagrams with {hop} 1 down the offloaded flow; the router "
        f"counted {expired} as expired in transit (InHdrErrors): the rest was forwarded"
    )
    assert late["other"] == 0 and received_late == 0, (
        f"{late['other']} packets with {hop} other than {SENT_TTL - 1} reached the server, "
        f"{received_late} B of the expiring datagrams were received: {report}"
    )


FRAG_MTU = 1000  # the client's link MTU while it fragments: a 1428-byte datagram -> 2 fragments
FRAGMENTED = 100  # datagrams the client sends fragmented down the offloaded flow


def test_fragments_of_an_offloaded_flow_are_reassembled_by_the_classic_path(
    router, host, endpoints, nft
):
    """An offloaded UDP upload whose sender's link MTU then drops: the same socket, the same
    5-tuple, now sends each datagram as two IPv4 fragments. Only the first fragment carries
    the UDP ports, so the flowtable must leave every fragment to the classic path, which
    reassembles the datagram (conntrack's defragmentation), forwards it and fragments it again
    for the wire. A fast path that took the first fragment would send it on alone, while the
    rest waits in reassembly for a first fragment that never comes: the datagram is lost."""
    assert nft.apply(router_ruleset()).rc == 0
    topo = router.topology
    client = topo.client
    fragmented = FRAGMENTED * traffic.UDP_PAYLOAD
    lost = ""
    with traffic.open_flow(endpoints, topo, "udp", 4, "up", NBYTES + fragmented) as t:
        before = sample_paths(nft, 4)
        t.feed(NBYTES)
        t.wait_received()
        during = sample_paths(nft, 4) - before
        entry = ct.the_entry(ct.proc_entries(host), "udp", t.flow.port)

        links.change(
            endpoints,
            f"ip -n {client.netns} link set dev {client.name} mtu {FRAG_MTU}",
            topo.endpoint_namespaces,
        )
        reasm_before = traffic.reassembly(host)
        # one 1400-byte pipe write per datagram (atomic: under PIPE_BUF), so socat reads and
        # sends each whole and every one is fragmented; a shorter read would fit the MTU,
        # take the fast path and overtake the fragmented ones (UDP keeps no order)
        t.feed(fragmented, pace=0.01, step=traffic.UDP_PAYLOAD)
        try:
            t.wait_received(timeout=30)
        except traffic.TransferError as exc:
            lost = str(exc).splitlines()[0]
        reasm = traffic.reassembly(host) - reasm_before
        still = ct.the_entry(ct.proc_entries(host), "udp", t.flow.port)
        result = t.close(timeout=5 if lost else 30)  # lost: no use waiting for more

    report = f"{t.flow}: {during}\n{entry.raw}\nrouter reassembly: {reasm}"
    assert entry.offloaded and during.mostly_offloaded(NBYTES), (
        f"not offloaded, so this says nothing about the fast path: {report}"
    )
    assert not lost and result.intact, (
        f"{FRAGMENTED} datagrams sent as fragments down the offloaded flow did not all "
        f"arrive intact ({lost or result}): {report}"
    )
    assert reasm.reassembled >= FRAGMENTED and reasm.fragments >= 2 * FRAGMENTED, (
        f"the router reassembled {reasm.reassembled} of the {FRAGMENTED} fragmented datagrams "
        f"({reasm.fragments} fragments): the rest did not take the classic path: {report}"
    )
    assert still.offloaded, f"the flow left the flowtable while fragments came: {still.raw}"
