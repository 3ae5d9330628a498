"""Port forwarding (DNAT) through the flowtable: the client connects to a service address and
port that the router rewrites to the server's own address and another port (what OpenWrt's
redirect and port-forward rules compile to in fw4). Conntrack rewrites the first packets;
once the flow is offloaded, the fast path must rewrite every later one the same way, the
destination on the way in and the source on the way back, or the stream breaks.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import traffic
from kmodtest.guest.nft import Nft
from kmodtest.guest.rulesets import router_ruleset, sample_paths

pytestmark = pytest.mark.per_nic

NBYTES = 1_000_000
SERVICE = {4: "203.0.113.80", 6: "2001:db8:80::80"}  # routed to the router, owned by no one
SERVICE_PORT_OFFSET = 10_000  # the client connects to the server's port + this
DNAT_TABLE = "kt_dnat"


def _forward_port(nft: Nft, proto: str, family: int, service_port: int, server: str, port: int):
    """The router DNATs (service address, service_port) to (server, port)."""
    ipf = "ip" if family == 4 else "ip6"
    to = f"{server}:{port}" if family == 4 else f"[{server}]:{port}"
    applied = nft.apply(
        f"table inet {DNAT_TABLE} {{\n  chain prerouting {{\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    {ipf} daddr {SERVICE[family]} {proto} dport {service_port} dnat {ipf} to {to}\n"
        "  }\n}"
    )
    assert applied.rc == 0, applied.stderr


# each function of the fast path's DNAT (IPv4 and IPv6 addresses, TCP and UDP ports and
# checksums) runs in one of these; both directions run in each
@pytest.mark.parametrize(
    ("proto", "family"), [("tcp", 4), ("udp", 6)], ids=["tcp-ipv4", "udp-ipv6"]
)
def test_port_forward_is_offloaded_and_rewrites_both_directions(
    router, host, endpoints, nft, proto, family
):
    assert nft.apply(router_ruleset()).rc == 0
    topo = router.topology
    server = topo.server.address(family)

    for direction in ("up", "down"):
        port = traffic.new_port()
        service_port = port + SERVICE_PORT_OFFSET
        host.check_output(f"nft delete table inet {DNAT_TABLE} 2>/dev/null || true")
        _forward_port(nft, proto, family, service_port, server, port)
        before = sample_paths(nft, family)
        with traffic.open_flow(
            endpoints, topo, proto, family, direction, NBYTES,
            server_ip=SERVICE[family], port=port, connect_port=service_port,
        ) as t:  # fmt: skip
            t.feed()
            t.wait_received()
            during = sample_paths(nft, family) - before
            entry = ct.the_entry(ct.proc_entries(host), proto, service_port)
            result = t.close()
        report = f"{t.flow} via {SERVICE[family]} port {service_port}: {during}\n{entry.raw}"

        assert entry.offloaded, f"no [OFFLOAD]: {report}{ct.state_report(host)}"
        # conntrack's view of the forward: the client asked for the service, the server answered
        assert (entry.orig.dst, entry.orig.dport) == (SERVICE[family], service_port), report
        assert (entry.reply.src, entry.reply.sport) == (server, port), report
        assert entry.reply.dst == topo.client.address(family), report  # no source NAT
        assert during.mostly_offloaded(NBYTES), f"classic path carried too much: {report}"
        assert result.intact, f"{result}\n{report}"
