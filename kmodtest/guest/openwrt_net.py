"""The network of an OpenWrt lab: the router configured the OpenWrt way, the endpoints in a VM.

Stock OpenWrt has no ``ip netns`` and no veth, so the client and server namespaces live in an
endpoints VM (the Debian image) whose NICs are cabled to the router's ``lan`` and ``wan`` by
the same dgram links as in one VM (:meth:`Topology.router_nics` / :meth:`endpoint_nics`).
On the router the two NICs are renamed ``lan`` and ``wan`` by MAC (so tests and rulesets name
the same devices on every router), netifd gets static addresses from the documentation ranges
through uci, and the set-up waits until netifd reports both interfaces up.

Not run against a real OpenWrt image on kmodtest's own machines (OpenWrt's servers are not
reachable there). The stand-in has no uci or netifd: its router half is set with busybox ``ip``
instead (:func:`plain_router_script`), an honest difference its docs name; the uci path is
proven where real images boot (CI's OpenWrt cells).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kmodtest.guest import links
from kmodtest.guest.router import ENDPOINTS, ROUTER
from kmodtest.guest.topology import Topology
from kmodtest.guest.vm import GuestVM

NETWORK_TIMEOUT = 120.0
# fw4 is stopped while the suite's tests own the ruleset; test_fw4 starts it itself
RESET = (
    "/etc/init.d/firewall stop >/dev/null 2>&1 || true\n"
    "[ ! -d /sys/module/nf_tables ] || nft flush ruleset\n"
    "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1\n"
)

NETIFD_WAIT = 60  # seconds for netifd to bring lan and wan up


@dataclass(frozen=True)
class OpenWrtNetwork:
    """An OpenWrt router VM (uci; busybox ``ip`` on the stand-in) and an endpoints VM."""

    topology: Topology
    stand_in: bool = False
    endpoints_role: str = ENDPOINTS

    def setup(self, guests: Mapping[str, GuestVM], timeout: float) -> None:
        script = plain_router_script if self.stand_in else uci_router_script
        guests[ROUTER].check(script(self.topology), timeout=timeout)
        guests[ENDPOINTS].check(self.topology.setup_script(router=False), timeout=timeout)
        guests[ROUTER].check(self._router_reset(), timeout=timeout)

    def reset(self, guests: Mapping[str, GuestVM]) -> None:
        """The router: fw4 stopped, no rules, forwarding on, links up; the endpoints as in one
        VM (addresses, routes, carrier)."""
        guests[ROUTER].check(self._router_reset(), timeout=NETWORK_TIMEOUT)
        guests[ENDPOINTS].check(self.topology.reset_script(router=False), timeout=NETWORK_TIMEOUT)

    def _router_reset(self) -> str:
        ups = "\n".join(f"ip link set dev {p.name} mtu 1500 up" for p in self.topology.router_ports)
        return f"set -e\n{RESET}{ups}\n{links.wait_script((None,))}\n"


def plain_router_script(topology: Topology) -> str:
    """The stand-in's router half (no uci, no netifd): rename by MAC, addresses with ``ip``."""
    lines = [
        "set -e",
        "byaddr() { for i in /sys/class/net/*; do "
        '[ "$(cat $i/address)" = "$1" ] && echo "${i##*/}"; done; return 0; }',
    ]
    for port in topology.router_ports:
        lines += [
            f'i=$(byaddr {port.mac}); [ -n "$i" ] || {{ echo "no NIC {port.mac}" >&2; exit 1; }}',
            f'[ "$i" = {port.name} ] || ip link set dev "$i" name {port.name}',
            f"ip link set dev {port.name} up",
            f"ip addr add {port.ipv4} dev {port.name}",
            f"ip -6 addr add {port.ipv6} dev {port.name}",
        ]
    return "\n".join(lines) + "\n"


def uci_router_script(topology: Topology) -> str:
    """Shell for the OpenWrt router: rename NICs by MAC, configure lan/wan with uci, wait."""
    lan, wan = (s.router for s in topology.segments)
    lines = [
        "set -e",
        "byaddr() { for i in /sys/class/net/*; do "
        '[ "$(cat $i/address)" = "$1" ] && echo "${i##*/}"; done; return 0; }',
    ]
    for port in (lan, wan):
        lines += [
            f'i=$(byaddr {port.mac}); [ -n "$i" ] || {{ echo "no NIC {port.mac}" >&2; exit 1; }}',
            f'[ "$i" = {port.name} ] || {{ ip link set dev "$i" down; '
            f'ip link set dev "$i" name {port.name}; }}',
        ]
    uci = [
        # no bridge: the flowtable and the tests see the NICs themselves
        "delete network.@device[0]",
        "set network.lan=interface",
        "set network.lan.proto=static",
        f"set network.lan.device={lan.name}",
        f"set network.lan.ipaddr={lan.address(4)}",
        "set network.lan.netmask=255.255.255.0",
        f"set network.lan.ip6addr={lan.ipv6}",
        "delete network.lan.ip6assign",
        "set network.wan=interface",
        "set network.wan.proto=static",
        f"set network.wan.device={wan.name}",
        f"set network.wan.ipaddr={wan.address(4)}",
        "set network.wan.netmask=255.255.255.0",
        f"set network.wan.ip6addr={wan.ipv6}",
        "delete network.wan6",
        "commit network",
    ]
    lines += [f"uci -q {cmd} || true" if cmd.startswith("delete") else f"uci {cmd}" for cmd in uci]
    lines += [
        "/etc/init.d/network reload",
        f"ubus -t {NETIFD_WAIT} wait_for network.interface.lan network.interface.wan",
        _wait_up(("lan", "wan")),
    ]
    return "\n".join(lines) + "\n"


def _wait_up(interfaces: tuple[str, ...]) -> str:
    checks = " && ".join(
        f"ubus call network.interface.{i} status | grep -q '\"up\": true'" for i in interfaces
    )
    return (
        "read u _ </proc/uptime; end=$(( ${u%.*} + " + str(NETIFD_WAIT) + " ))\n"
        f"until {checks}; do\n"
        "  read u _ </proc/uptime\n"
        f'  [ ${{u%.*}} -lt $end ] || {{ echo "netifd: {"/".join(interfaces)} not up after '
        f'{NETIFD_WAIT} s" >&2; ifstatus lan >&2; ifstatus wan >&2; exit 1; }}\n'
        "  sleep 0.5\n"
        "done"
    )
