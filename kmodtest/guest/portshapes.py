"""Router ports shaped the way OpenWrt shapes them, over the plain test network.

OpenWrt routes its LAN from a bridge (``br-lan``) over the LAN ports, and with DSA switch
configs from a VLAN of a VLAN-filtering bridge (``br-lan.1``); many ISPs hand out the WAN in a
VLAN (``wan.7``), some inside a carrier's service VLAN (QinQ). The flowtable is still hooked on
the physical ports (fw4 lists the lower devices), and the flow's route then goes through the
bridge or VLAN(s): the flowtable must record the tags and the bridge port when the flow is
added, match tagged packets on ingress, strip the tags, and transmit straight to the bridge
port (``FLOW_OFFLOAD_XMIT_DIRECT``). None of that code runs on plain ports.

A LAN bridge can also carry its own VLAN tagged on a port (a trunk to a managed switch or an
access point with VLANs): the addresses stay on ``br-lan``, whose untagged traffic the bridge
puts in its PVID, and the port sends that VLAN tagged. Then the flowtable itself must push the
tag on transmit (``DEV_PATH_BR_VLAN_TAG``), where in the DSA shape a VLAN device did it.

Each shape is a context manager: it reshapes the router's ``lan`` or ``wan`` (and the
endpoint facing it), and undoes it afterwards; the reset between tests puts the plain
ports' addresses back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import testinfra.host

from kmodtest.guest import links
from kmodtest.guest.topology import Topology

BRIDGE = "br-lan"
LAN_VLAN = 1  # OpenWrt's default LAN VLAN on DSA switches (br-lan.1)
TRUNK_VLAN = 10  # the LAN bridge's PVID, tagged on a trunk port
WAN_VLAN = 7  # a VLAN id ISPs commonly tag their WAN with
SERVICE_VLAN = 100  # an 802.1ad service VLAN (S-tag) around WAN_VLAN: QinQ


@dataclass(frozen=True)
class Shaped:
    """The reshaped port: where the router's addresses of that segment now live, and where
    the endpoint now has its own (the flow's target, for a reshaped WAN)."""

    router_dev: str
    ipv4: str  # the endpoint's address (no prefix) on the shaped segment
    ipv6: str
    client_dev: str | None = None  # where the client now receives, if not on its own port

    def address(self, family: int) -> str:
        return self.ipv4 if family == 4 else self.ipv6


def _router_addresses(topology: Topology, dev: str) -> str:
    lan = topology.segments[0].router
    return f"ip addr add {lan.ipv4} dev {dev}\nip addr add {lan.ipv6} dev {dev} nodad\n"


BridgeShape = Literal["bridge", "dsa", "trunk"]


@contextmanager
def bridged_lan(
    host: testinfra.host.Host, topology: Topology, shape: BridgeShape = "bridge"
) -> Iterator[Shaped]:
    """The router's ``lan`` port becomes a port of ``br-lan``, which holds the LAN addresses.

    ``dsa``: a VLAN-filtering bridge whose ``lan`` port is an untagged member of VLAN 1 and
    whose addresses are on ``br-lan.1``. ``trunk``: a VLAN-filtering bridge with its addresses
    on itself, in its PVID ``TRUNK_VLAN``, which the ``lan`` port carries tagged; the client
    then has its addresses on ``eth0.<TRUNK_VLAN>``.
    """
    lan = topology.segments[0].router
    l3 = BRIDGE
    if shape == "dsa":
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
    elif shape == "trunk":
        bridge = (
            f"ip link add {BRIDGE} address {lan.mac} type bridge vlan_filtering 1\n"
            f"ip link set {lan.name} master {BRIDGE}\n"
            f"bridge vlan del dev {lan.name} vid 1\n"
            f"bridge vlan add dev {lan.name} vid {TRUNK_VLAN}\n"  # tagged: not pvid untagged
            f"bridge vlan del dev {BRIDGE} vid 1 self\n"
            f"bridge vlan add dev {BRIDGE} vid {TRUNK_VLAN} pvid untagged self\n"
        )
    else:
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
    client_dev = None
    if shape == "trunk":
        client_dev = f"{client.name}.{TRUNK_VLAN}"
        setup += _move_endpoint(topology, client_dev, TRUNK_VLAN)
    try:
        links.change(host, setup, topology.namespaces)
        yield Shaped(l3, client.address(4), client.address(6), client_dev)
    finally:  # the reset between tests puts the client's addresses back on its own port
        undo = f"ip -n {client.netns} link del {client_dev} 2>/dev/null; " if client_dev else ""
        host.run(f"{undo}ip link del {BRIDGE} 2>/dev/null; true")


def _move_endpoint(topology: Topology, dev: str, vid: int) -> str:
    """Shell: the client's addresses and default routes move from its port to VLAN ``vid``."""
    client, lan = topology.client, topology.segments[0].router
    ns = client.netns
    return (
        f"ip -n {ns} addr flush dev {client.name} scope global\n"
        f"ip -n {ns} link add link {client.name} name {dev} type vlan id {vid}\n"
        f"ip -n {ns} addr add {client.ipv4} dev {dev}\n"
        f"ip -n {ns} addr add {client.ipv6} dev {dev} nodad\n"
        f"ip -n {ns} link set {dev} up\n"
        f"ip -n {ns} route replace default via {lan.address(4)} dev {dev}\n"
        f"ip -n {ns} route replace default via {lan.address(6)} dev {dev}\n"
    )


@dataclass(frozen=True)
class WanVlan:
    router_ipv4: str = "203.0.113.129/26"
    server_ipv4: str = "203.0.113.130/26"
    router_ipv6: str = "2001:db8:7::1/64"
    server_ipv6: str = "2001:db8:7::2/64"


QINQ_MTU = 1492  # the customer VLAN's MTU inside a service VLAN: the two tags fit a 1518-byte frame


@contextmanager
def wan_vlan(
    host: testinfra.host.Host, topology: Topology, service_vlan: int | None = None
) -> Iterator[Shaped]:
    """The server is reached in VLAN 7 over the ``wan`` cable: ``wan.7`` on the router,
    ``eth0.7`` on the server, a subnet of their own, and the server's way back to the LAN
    through it (the untagged WAN stays as it was).

    ``service_vlan``: QinQ, VLAN 7 carried inside an 802.1ad service VLAN of that id
    (``wan.<id>.7``), as carriers hand out wholesale lines: every frame has two tags, and the
    inner one stays in the packet when the NIC's receive path lifts the outer one off.
    """
    v = WanVlan()
    wan, server = topology.segments[1].router, topology.server
    ns = server.netns
    r_base, s_base, stack, mtu = wan.name, server.name, "", ""
    if service_vlan is not None:
        r_base, s_base = f"{wan.name}.{service_vlan}", f"{server.name}.{service_vlan}"
        s_tag = f"type vlan proto 802.1ad id {service_vlan}"
        stack = (
            f"ip link add link {wan.name} name {r_base} {s_tag}\nip link set {r_base} up\n"
            f"ip -n {ns} link add link {server.name} name {s_base} {s_tag}\n"
            f"ip -n {ns} link set {s_base} up\n"
        )
        mtu = f" mtu {QINQ_MTU}"
    r_dev, s_dev = f"{r_base}.{WAN_VLAN}", f"{s_base}.{WAN_VLAN}"
    lan4 = topology.segments[0].router.ipv4
    lan6 = topology.segments[0].router.ipv6
    setup = f"""{stack}ip link add link {r_base} name {r_dev}{mtu} type vlan id {WAN_VLAN}
ip addr add {v.router_ipv4} dev {r_dev}
ip addr add {v.router_ipv6} dev {r_dev} nodad
ip link set {r_dev} up
ip -n {ns} link add link {s_base} name {s_dev}{mtu} type vlan id {WAN_VLAN}
ip -n {ns} addr add {v.server_ipv4} dev {s_dev}
ip -n {ns} addr add {v.server_ipv6} dev {s_dev} nodad
ip -n {ns} link set {s_dev} up
ip -n {ns} route add {_network(lan4)} via {v.router_ipv4.split("/")[0]} dev {s_dev}
ip -n {ns} route add {_network(lan6)} via {v.router_ipv6.split("/")[0]} dev {s_dev}
"""
    try:
        links.change(host, setup, topology.namespaces)
        yield Shaped(r_dev, v.server_ipv4.split("/")[0], v.server_ipv6.split("/")[0])
    finally:  # the lowest VLAN device: deleting it takes the one stacked on it along
        r_low, s_low = (r_base, s_base) if service_vlan is not None else (r_dev, s_dev)
        host.run(f"ip link del {r_low} 2>/dev/null; ip -n {ns} link del {s_low} 2>/dev/null; true")


def _network(interface: str) -> str:
    """192.0.2.1/24 -> 192.0.2.0/24 (the route the server needs back to the LAN)."""
    return str(ipaddress.ip_interface(interface).network)
