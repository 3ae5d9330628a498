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

On DSL (and many fibre) lines the WAN is a PPPoE session: pppd's ``pppoe-wan`` (here
``ppp0``) over the ``wan`` port, in kernel mode. The flowtable is still on ``wan``; the flow's
route goes through the ppp device, whose path the flowtable resolves to the session on
``wan`` (``DEV_PATH_PPPOE``), and packets of the flow then arrive as PPPoE session frames that
its ingress hook must recognise and strip.

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


@dataclass(frozen=True)
class WanPppoe:
    """Both ends of the PPPoE session: IPCP hands out the IPv4 addresses (the access
    concentrator assigns both), IPv6CP the link-local interface ids, and each end adds a
    static global IPv6 address on top (no DHCPv6-PD here)."""

    router_ipv4: str = "203.0.113.193"  # a range of its own: not the VLAN WAN's /26
    server_ipv4: str = "203.0.113.194"
    router_ipv6: str = "2001:db8:8::1/64"
    server_ipv6: str = "2001:db8:8::2/64"
    router_id: str = "::1"  # IPv6CP interface identifiers: fe80::1 and fe80::2
    server_id: str = "::2"


PPP_DEV = "ppp0"  # the session's device on either end: pppd's unit 0 in each namespace
PPPOE_WORK = "/tmp/kmodtest-pppoe"  # the daemons' pid files, options and logs, in the guest
SESSION_WAIT = 30  # guest seconds for discovery, LCP, IPCP and IPv6CP; ~2.5 s under TCG
STOP_WAIT = 10  # guest seconds for pppd and pppoe-server to exit on SIGTERM, before SIGKILL

# sh: run a command in the background in a namespace (``-``: the router's own), with its own
# PID (not a wrapper's) in a file, and its output in a log
_SPAWN = r"""spawn() { pidf=$1; log=$2; ns=$3; shift 3
  if [ "$ns" = - ]; then set -- sh -c 'echo $$ >"$0"; exec "$@"' "$pidf" "$@"
  else set -- ip netns exec "$ns" sh -c 'echo $$ >"$0"; exec "$@"' "$pidf" "$@"; fi
  "$@" </dev/null >"$log" 2>&1 &
  until [ -s "$pidf" ]; do sleep 0.05; done; }
alive() { [ -n "$1" ] && [ -e "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"; }
"""


class PppoeError(AssertionError):
    """The PPPoE session did not come up, or its daemons did not stop (fails the test)."""


@contextmanager
def wan_pppoe(host: testinfra.host.Host, topology: Topology) -> Iterator[Shaped]:
    """The server is reached through a PPPoE session over the ``wan`` cable, as a DSL router
    reaches its ISP: the server namespace is the access concentrator (rp-pppoe's
    ``pppoe-server`` on its ``eth0``), the router dials it with pppd's PPPoE plugin on ``wan``
    (no authentication). The session's ``ppp0`` on each end gets the addresses of
    :class:`WanPppoe`, and the server routes the LAN back through its ``ppp0`` (its default
    route over the plain ``eth0`` stays, as do the plain WAN addresses).

    The router's end is kernel-mode PPPoE on both suites (pppd's ``pppoe.so``). The
    concentrator's end is kernel-mode where rp-pppoe has it (``-k``: 4.0, trixie) and rp-pppoe's
    user-mode ``pppoe`` relay behind a pty where it has not (3.15, bookworm, built without it);
    on the wire both are the same session frames.
    """
    v = WanPppoe()
    wan, server = topology.segments[1].router, topology.server
    ns, d = server.netns, PPPOE_WORK
    lan4, lan6 = topology.segments[0].router.ipv4, topology.segments[0].router.ipv6
    logs = f"{d}/pppd.log (the router's pppd), {d}/isp-pppd.log, {d}/pppoe-server.log"
    # the concentrator's pppd: pppoe-server adds the plugin or pty, the IPCP addresses (-L/-R),
    # nodetach and mru/mtu 1492; /etc/ppp/options (auth, lcp-echo-interval 30) comes first
    isp_options = "\n".join(
        ["noauth", "+ipv6", f"ipv6 {v.server_id},{v.router_id}", "unit 0",
         "debug", f"logfile {d}/isp-pppd.log"]
    )  # fmt: skip
    setup = f"""{_SPAWN}set -e
rm -rf {d}; mkdir -p {d}
[ -d /sys/module/pppoe ] || modprobe pppoe
plugin=$(echo /usr/lib/pppd/*/pppoe.so)
[ -e "$plugin" ] || {{ echo "no pppd PPPoE plugin: /usr/lib/pppd/*/pppoe.so" >&2; exit 1; }}
printf '{isp_options}\n' >{d}/isp-options
if pppoe-server -h 2>&1 | grep -q -- ' -k '; then mode="-k -g $plugin"
else mode=; [ -d /sys/module/ppp_async ] || modprobe ppp_async; fi
spawn {d}/pppoe-server.pid {d}/pppoe-server.log {ns} \
  pppoe-server -F -I {server.name} $mode -N 1 -L {v.server_ipv4} -R {v.router_ipv4} \
  -O {d}/isp-options
# its discovery socket must be bound before the router's first PADI
i=0; until ip netns exec {ns} grep -q ' 8863 ' /proc/net/packet; do
  alive $(cat {d}/pppoe-server.pid) && [ $i -lt 100 ] || {{
    echo "pppoe-server did not start" >&2; exit 1; }}
  i=$((i + 1)); sleep 0.1
done
spawn {d}/pppd.pid {d}/pppd.out - pppd plugin $plugin nic-{wan.name} unit 0 \
  noauth nodetach noipdefault +ipv6 ipv6 {v.router_id},{v.server_id} debug logfile {d}/pppd.log
# up: IPCP and IPv6CP are done, the device has its IPv4 and link-local IPv6 address
up() {{ a=$("$@" -o addr show dev {PPP_DEV} 2>/dev/null) || return 1
  case $a in *" inet "*) ;; *) return 1;; esac
  case $a in *" inet6 fe80::"*) ;; *) return 1;; esac; }}
read u _ </proc/uptime; end=$(( ${{u%.*}} + {SESSION_WAIT} ))
until up ip && up ip -n {ns}; do
  alive $(cat {d}/pppd.pid) || {{ echo "the router's pppd exited" >&2; exit 1; }}
  read u _ </proc/uptime
  [ ${{u%.*}} -lt $end ] || {{ echo "no PPPoE session after {SESSION_WAIT} s" >&2; exit 1; }}
  sleep 0.1
done
# the concentrator's pppd: pppoe-server's child (its pid file's path differs between versions)
srv=$(cat {d}/pppoe-server.pid)
for s in /proc/[0-9]*/stat; do
  read -r pid _ _ ppid _ <$s 2>/dev/null && [ "$ppid" = "$srv" ] && echo $pid
done >{d}/isp-pppd.pid
ip addr add {v.router_ipv6} dev {PPP_DEV} nodad
ip -n {ns} addr add {v.server_ipv6} dev {PPP_DEV} nodad
ip -n {ns} route add {_network(lan4)} dev {PPP_DEV}
ip -n {ns} route add {_network(lan6)} dev {PPP_DEV}
"""
    try:
        result = host.run(setup, timeout=SESSION_WAIT + 60)
        if result.rc != 0:
            raise PppoeError(
                f"PPPoE session on {wan.name} did not come up: {result.stderr.strip()}\n"
                f"logs: {logs}\n{_logs(host)}"
            )
        yield Shaped(PPP_DEV, v.server_ipv4, v.server_ipv6.split("/")[0])
    finally:
        _stop(host)


def pppoe_sent_bytes(host: testinfra.host.Host, topology: Topology) -> int:
    """Bytes the concentrator has sent into the session so far (its ppp device's counter)."""
    path = f"/sys/class/net/{PPP_DEV}/statistics/tx_bytes"
    return int(host.check_output(f"ip netns exec {topology.server.netns} cat {path}"))


def _logs(host: testinfra.host.Host) -> str:
    out = host.run(
        f'cd {PPPOE_WORK} 2>/dev/null && for f in *.log *.out; do [ -e "$f" ] || continue; '
        'echo "== $f"; tail -n 30 "$f"; done'
    )
    return str(out.stdout)


def _stop(host: testinfra.host.Host) -> None:
    """SIGTERM to pppd and pppoe-server (which stops the concentrator's pppd, and that its pty
    relay), SIGKILL to what is left after :data:`STOP_WAIT` s; the ppp devices, their
    addresses and routes go with the pppds. Raises if a daemon outlives SIGKILL."""
    d = PPPOE_WORK
    script = f"""{_SPAWN}cd {d} 2>/dev/null || exit 0
pids=$(cat pppd.pid pppoe-server.pid isp-pppd.pid 2>/dev/null) || true
[ -n "$pids" ] || exit 0
kill -TERM $pids 2>/dev/null || true
left() {{ l=; for p in $pids; do alive $p && l="$l $p"; done; [ -n "$l" ]; }}
read u _ </proc/uptime; end=$(( ${{u%.*}} + {STOP_WAIT} ))
while left; do
  read u _ </proc/uptime; [ ${{u%.*}} -lt $end ] || break; sleep 0.1
done
if left; then kill -KILL $l 2>/dev/null; sleep 1; fi
if left; then echo "still running after SIGKILL:$l" >&2; exit 1; fi
rm -f pppd.pid pppoe-server.pid isp-pppd.pid
"""
    result = host.run(script, timeout=STOP_WAIT + 30)
    if result.rc != 0:
        raise PppoeError(f"PPPoE daemons did not stop: {result.stderr.strip()}\n{_logs(host)}")


def _network(interface: str) -> str:
    """192.0.2.1/24 -> 192.0.2.0/24 (the route the server needs back to the LAN)."""
    return str(ipaddress.ip_interface(interface).network)
