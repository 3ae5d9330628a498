"""The default test network, all inside one VM: client -- router -- server.

The router owns ``lan`` and ``wan``; the client and server are network namespaces, each with
its own emulated NIC wired to the router's by a QEMU dgram link, so traffic really crosses the
NIC drivers (and the flowtable sees real ingress devices) without root on the host.
Addresses are from the documentation ranges (RFC 5737 / RFC 3849): nothing leaves the VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.guest import links
from kmodtest.nics import get_nic
from kmodtest.prepare.cells import PASSTHROUGH_NIC
from kmodtest.run.machine import DgramLink, HostPciLink, Nic

# Passthrough NICs sit at fixed slots of the guest's root bus (lan, client, wan, server), which
# is how the guest finds them: their MAC addresses are the hardware's own.
PASSTHROUGH_SLOTS = {"lan": 0x10, "client": 0x11, "wan": 0x12, "server": 0x13}


@dataclass(frozen=True)
class Port:
    name: str  # interface name in the guest
    netns: str | None  # None: the router's own namespace
    mac: str
    ipv4: str  # address/prefix
    ipv6: str

    def address(self, family: int = 4) -> str:
        """The bare address (no prefix) of the given IP family."""
        return (self.ipv4 if family == 4 else self.ipv6).split("/")[0]


@dataclass(frozen=True)
class Segment:
    """One Ethernet link: a router port and the endpoint port facing it."""

    name: str
    router: Port
    endpoint: Port


# The client's addresses differ from the router's WAN addresses in their 16-bit one's-complement
# sums (tests/test_topology.py): masquerade rewrites one into the other, and with equal sums
# (2001:db8:1::2 and 2001:db8:2::1 have them) the TCP/UDP checksum would come out right even
# if the router never updated it, so an IPv6 NAT checksum bug could not fail any test.
LAN = Segment(
    "lan",
    Port("lan", None, "52:54:00:6b:00:01", "192.0.2.1/24", "2001:db8:1::1/64"),
    Port("eth0", "client", "52:54:00:6b:01:01", "192.0.2.2/24", "2001:db8:1::20/64"),
)
WAN = Segment(
    "wan",
    Port("wan", None, "52:54:00:6b:00:02", "198.51.100.1/24", "2001:db8:2::1/64"),
    Port("eth0", "server", "52:54:00:6b:02:01", "198.51.100.2/24", "2001:db8:2::2/64"),
)


@dataclass(frozen=True)
class Topology:
    nic_model: str
    segments: tuple[Segment, ...] = (LAN, WAN)
    # for the vfio-pci model: host PCI address per port (lan, client, wan, server)
    passthrough: Mapping[str, str] = field(default_factory=dict)

    @property
    def passthrough_ports(self) -> bool:
        return self.nic_model == PASSTHROUGH_NIC

    @property
    def client(self) -> Port:
        return self.segments[0].endpoint

    @property
    def server(self) -> Port:
        return self.segments[1].endpoint

    @property
    def router_ports(self) -> tuple[Port, ...]:
        return tuple(s.router for s in self.segments)

    @property
    def namespaces(self) -> tuple[str | None, ...]:
        """The router's namespace (None) and each endpoint's: where links must have carrier."""
        return (None, *self.endpoint_namespaces)

    @property
    def endpoint_namespaces(self) -> tuple[str | None, ...]:
        return tuple(s.endpoint.netns for s in self.segments)

    def router_nics(self, run_dir: Path) -> tuple[Nic, ...]:
        """The router's half of :meth:`nics`, for a router in a VM of its own (two-VM labs)."""
        names = {p.name for p in self.router_ports}
        return tuple(n for n in self.nics(run_dir) if n.name in names)

    def endpoint_nics(self, run_dir: Path) -> tuple[Nic, ...]:
        """The client's and server's half of :meth:`nics`: the endpoints VM's NICs."""
        names = {p.name for p in self.router_ports}
        return tuple(n for n in self.nics(run_dir) if n.name not in names)

    def nics(self, run_dir: Path) -> tuple[Nic, ...]:
        if self.passthrough_ports:
            return tuple(
                Nic(port, PASSTHROUGH_NIC, "", HostPciLink(self.passthrough[port], slot))
                for port, slot in PASSTHROUGH_SLOTS.items()
            )
        out = []
        for seg in self.segments:
            a, b = run_dir / f"{seg.name}-r.sock", run_dir / f"{seg.name}-e.sock"
            out.append(Nic(seg.router.name, self.nic_model, seg.router.mac, DgramLink(a, b)))
            out.append(
                Nic(f"{seg.name}-{seg.endpoint.netns}", self.nic_model, seg.endpoint.mac,
                    DgramLink(b, a))
            )  # fmt: skip
        return tuple(out)

    def setup_script(self, router: bool = True, endpoints: bool = True) -> str:
        """Name NICs by MAC, move endpoints into namespaces; then :meth:`reset_script`.

        In two-VM labs each VM runs its half: ``endpoints=False`` on the router VM,
        ``router=False`` on the endpoints VM."""
        lines = [
            "set -e",
            "byaddr() { for i in /sys/class/net/*; do "
            '[ "$(cat $i/address)" = "$1" ] && echo "${i##*/}"; done; return 0; }',
        ]
        if self.passthrough_ports:
            lines += self._passthrough_setup()
        else:
            lines.insert(1, f"modprobe {get_nic(self.nic_model).driver}")
        for seg in self.segments:
            r, e = seg.router, seg.endpoint
            if router:
                lines += [
                    f'i=$(byaddr {r.mac}); [ -n "$i" ] || {{ echo "no NIC {r.mac}" >&2; exit 1; }}',
                    f'[ "$i" = {r.name} ] || ip link set dev "$i" name {r.name}',
                ]
            if not endpoints:
                continue
            lines += [
                f"ip netns add {e.netns}",
                f"ip -n {e.netns} link set lo up",
                f'i=$(byaddr {e.mac}); [ -n "$i" ] || {{ echo "no NIC {e.mac}" >&2; exit 1; }}',
                f'ip link set dev "$i" netns {e.netns}',
                f'ip -n {e.netns} link set dev "$i" name {e.name}',
            ]
        return "\n".join(lines) + "\n" + self.reset_script(router, endpoints)

    def _passthrough_setup(self) -> list[str]:
        """Load each passthrough NIC's driver by its modalias, then give it our port's MAC.

        The rest of the set-up then finds every port by MAC, as with emulated NICs.
        """
        lines = [
            "bypci() { d=/sys/bus/pci/devices/0000:00:$1.0; [ -d $d ] || return 0; "
            'modprobe -q "$(cat $d/modalias)" || true; n=0; while [ $n -lt 100 ]; do '
            'for i in $d/net/*; do [ -e "$i" ] && { echo "${i##*/}"; return 0; }; done; '
            "sleep 0.1; n=$((n+1)); done; return 0; }",
        ]
        macs = {s.name: s.router.mac for s in self.segments}
        macs.update({str(s.endpoint.netns): s.endpoint.mac for s in self.segments})
        for port, slot in PASSTHROUGH_SLOTS.items():
            where = f"guest slot {slot:02x}, host {self.passthrough.get(port)}"
            lines += [
                f'i=$(bypci {slot:02x}); [ -n "$i" ] || '
                f'{{ echo "no driver bound the {port} NIC ({where})" >&2; exit 1; }}',
                f'ip link set dev "$i" address {macs[port]}',
            ]
        return lines

    def reset_script(self, router: bool = True, endpoints: bool = True) -> str:
        """Bring the network back to its known state: no rules, no flows, addresses, routes.
        (Each VM of a two-VM lab its half, as in :meth:`setup_script`.)

        One ``ip -batch`` per namespace: under TCG each exec of ``ip`` costs 50-100 ms, so
        twenty separate calls would dominate the per-test overhead. Ends with the link wait: a
        test may have taken a link down or changed its MTU, which resets e1000e's link.
        """
        nic = None if self.passthrough_ports else get_nic(self.nic_model)  # real NICs: none
        link = f"mtu 1500 {nic.link_options if nic else ''}".strip()
        ports = []
        namespaces: dict[str, list[str]] = {}
        for seg in self.segments:
            r, e = seg.router, seg.endpoint
            ports += [
                f"link set dev {r.name} {link} up",
                f"addr replace {r.ipv4} dev {r.name}",
                f"addr replace {r.ipv6} dev {r.name} nodad",
            ]
            namespaces[str(e.netns)] = [
                f"link set dev {e.name} {link} up",
                f"addr replace {e.ipv4} dev {e.name}",
                f"addr replace {e.ipv6} dev {e.name} nodad",
                f"route replace default via {r.address(4)}",
                f"route replace default via {r.address(6)}",  # family from the gateway
            ]
        lines = ["set -e"]
        if router:
            lines += [
                "[ ! -d /sys/module/nf_tables ] || nft flush ruleset",
                "[ ! -d /sys/module/nf_conntrack_netlink ] || conntrack -F >/dev/null 2>&1 || true",
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
                _batch("ip -batch -", ports),
            ]
        if endpoints:
            lines += [_batch(f"ip -n {ns} -batch -", cmds) for ns, cmds in namespaces.items()]
        waits = ((None,) if router else ()) + (self.endpoint_namespaces if endpoints else ())
        lines.append(links.wait_script(waits))
        return "\n".join(lines) + "\n"


def _batch(command: str, lines: list[str]) -> str:
    body = "\n".join(lines)
    return f"{command} <<'KMODTEST_EOF'\n{body}\nKMODTEST_EOF"
