"""Router ports shaped the way OpenWrt shapes them, over the plain test network.

OpenWrt routes its LAN from a bridge (``br-lan``) over the LAN ports, and with DSA switch
configs from a VLAN of a VLAN-filtering bridge (``br-lan.1``); many ISPs hand out the WAN in a
VLAN (``wan.7``). The flowtable is still hooked on the physical ports (fw4 lists the lower
devices), and the flow's route then goes through the bridge or VLAN: the flowtable must
record the tags and the bridge port when the flow is added, match tagged packets on
ingress, strip the tag, and transmit straight to the bridge port (``FLOW_OFFLOAD_XMIT_DIRECT``).
None of that code runs on plain ports.

Each shape is a context manager: it reshapes the router's ``lan`` or ``wan`` (and the
endpoint facing it), and undoes it afterwards; the reset between tests puts the plain
ports' addresses back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import testinfra.host

from kmodtest.guest import links
from kmodtest.guest.topology import Topology

BRIDGE = "br-lan"
LAN_VLAN = 1  # OpenWrt's default LAN VLAN on DSA switches (br-lan.1)
WAN_VLAN = 7  # a VLAN id ISPs commonly tag their WAN with


@dataclass(frozen=True)
class Shaped:
    """The reshaped port: where the router's addresses of that segment now live, and where
    the endpoint now has its own (the flow's target, for a reshaped WAN)."""

    router_dev: str
    ipv4: str  # the endpoint's address (no prefix) on the shaped segment
    ipv6: str

    def address(self, family: int) -> str:
        return self.ipv4 if family == 4 else self.ipv6


def _router_addresses(topology: Topology, dev: str) -> str:
    lan = topology.segments[0].router
    return f"ip addr add {lan.ipv4} dev {dev}\nip addr add {lan.ipv6} dev {dev} nodad\n"


@contextmanager
def bridged_lan(
    host: testinfra.host.Host, topology: Topology, vlan_filtering: bool = False
) -> Iterator[Shaped]:
    """The router's ``lan`` port becomes a port of ``br-lan``, which holds the LAN addresses.

    ``vlan_filtering``: the DSA shape, a VLAN-filtering bridge whose ``lan`` port is an
    untagged member of VLAN 1 and whose addresses are on ``br-lan.1``.
    """
    lan = topology.segments[0].router
    if vlan_filtering:
        l3 = f"{BRIDGE}.{LAN_VLAN}"
        bridge = (
            f"ip link add {BRIDGE} address {lan.mac} type bridge vlan_filtering 1\n"
            f"ip link set {lan.name} master {BRIDGE}\n"
            # the bridge's own port carries VLAN 1 tagged, to br-lan.1 (not untagged, the default)
            f"bridge vlan del dev {BRIDGE} vid {LAN_VLAN} self\n"
            f"bridge vlan add dev {BRIDGE} vid {LAN_VLAN} self\n"
            f"ip link add link {BRIDGE} name {l3} address {lan.mac} type vlan id {LAN_VLAN}\n"
            f"ip link set {BRIDGE} up\n"
        )
    else:
        l3 = BRIDGE
        bridge = (
            f"ip link add {BRIDGE} address {lan.mac} type bridge\n"
            f"ip link set {lan.name} master {BRIDGE}\n"
        )
    # only the global addresses move to the bridge: the port keeps its link-local one, which
    # the reset between tests does not restore, and without which the router sends no IPv6
    # neighbour solicitation on it for forwarded packets (ndisc_send_ns needs a link-local
    # source): every later IPv6 download on the plain lan port would stall
    setup = (
        f"ip addr flush dev {lan.name} scope global\n{bridge}{_router_addresses(topology, l3)}"
        f"ip link set {l3} up\n"
    )
    client = topology.client
    try:
        links.change(host, setup, topology.namespaces)
        yield Shaped(l3, client.address(4), client.address(6))
    finally:
        host.run(f"ip link del {BRIDGE} 2>/dev/null; true")


@dataclass(frozen=True)
class WanVlan:
    router_ipv4: str = "203.0.113.129/26"
    server_ipv4: str = "203.0.113.130/26"
    router_ipv6: str = "2001:db8:7::1/64"
    server_ipv6: str = "2001:db8:7::2/64"


@contextmanager
def wan_vlan(host: testinfra.host.Host, topology: Topology) -> Iterator[Shaped]:
    """The server is reached in VLAN 7 over the ``wan`` cable: ``wan.7`` on the router,
    ``eth0.7`` on the server, a subnet of their own, and the server's way back to the LAN
    through it (the untagged WAN stays as it was)."""
    v = WanVlan()
    wan, server = topology.segments[1].router, topology.server
    ns, r_dev, s_dev = server.netns, f"{wan.name}.{WAN_VLAN}", f"{server.name}.{WAN_VLAN}"
    lan4 = topology.segments[0].router.ipv4
    lan6 = topology.segments[0].router.ipv6
    setup = f"""ip link add link {wan.name} name {r_dev} type vlan id {WAN_VLAN}
ip addr add {v.router_ipv4} dev {r_dev}
ip addr add {v.router_ipv6} dev {r_dev} nodad
ip link set {r_dev} up
ip -n {ns} link add link {server.name} name {s_dev} type vlan id {WAN_VLAN}
ip -n {ns} addr add {v.server_ipv4} dev {s_dev}
ip -n {ns} addr add {v.server_ipv6} dev {s_dev} nodad
ip -n {ns} link set {s_dev} up
ip -n {ns} route add {_network(lan4)} via {v.router_ipv4.split("/")[0]} dev {s_dev}
ip -n {ns} route add {_network(lan6)} via {v.router_ipv6.split("/")[0]} dev {s_dev}
"""
    try:
        links.change(host, setup, topology.namespaces)
        yield Shaped(r_dev, v.server_ipv4.split("/")[0], v.server_ipv6.split("/")[0])
    finally:
        host.run(f"ip link del {r_dev} 2>/dev/null; ip -n {ns} link del {s_dev} 2>/dev/null; true")


def _network(interface: str) -> str:
    """192.0.2.1/24 -> 192.0.2.0/24 (the route the server needs back to the LAN)."""
    return str(ipaddress.ip_interface(interface).network)
