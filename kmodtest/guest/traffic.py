"""Real TCP and UDP transfers between the client and server namespaces, checked by sha256.

Why this shape: an offload test must read kernel state *while* its flow is alive and decide
when the flow ends. So the sending socat reads a FIFO that a holder process keeps open: the
test feeds bytes when it wants (all at once, in steps, or in the background), waits until the
receiver has them, inspects conntrack and counters, then closes (a FIN after the last byte).
The client always opens the connection (so masquerade on ``wan`` applies); ``direction`` says
which way the payload goes. Guest processes write only to their own files, never to the
agent's output, and each is bounded in time (socat ``-T``, the holder's sleep).
"""

from __future__ import annotations

import itertools
import json
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import testinfra.host

from kmodtest.guest import links
from kmodtest.guest.topology import Topology

Proto = Literal["tcp", "udp"]
Direction = Literal["up", "down"]  # up: client -> server, down: server -> client

UDP_PAYLOAD = 1400  # bytes per datagram: fits both families' 1500-byte MTU, so no fragments
# SO_RCVBUFFORCE (SOL_SOCKET=1, 33) = 16 MiB: a UDP receiver on one emulated CPU falls behind
# in bursts, and the default buffer (rmem_max, ~200 KiB) then drops datagrams (RcvbufErrors).
# socat applies plain setsockopt* options too late on UDP-LISTEN; -listen is the phase that
# works there, and it takes the value as raw bytes (little-endian int).
UDP_RCVBUF = {
    "listen": "setsockopt-listen=1:33:x00000001",
    "connect": "setsockopt-int=1:33:16777216",
}
IDLE_LIMIT = 90  # socat -T: a forgotten process exits after this many idle seconds
HOLD_LIMIT = 600  # the FIFO holder's lifetime, seconds
WORK_ROOT = "/tmp/kt-xfer"
_ports = itertools.count(5001)

# Polls in the guest (one agent round trip per wait, not one per probe).
_SH_LIB = r"""
waitfor() { t=$1; shift; read u _ </proc/uptime; end=$(( ${u%.*} + t ))
  until "$@"; do read u _ </proc/uptime; [ ${u%.*} -lt $end ] || return 1; sleep 0.05; done; }
size() { s=$(stat -c %s "$1" 2>/dev/null) || s=0; echo "$s"; }
has() { [ "$(size "$1")" -ge "$2" ]; }
listening() { grep -qi "$2" "/proc/$(cat "$1" 2>/dev/null || echo 0)/net/$3" 2>/dev/null; }
alive() { [ -e "/proc/$(cat "$1" 2>/dev/null || echo 0)/stat" ] && \
  ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$(cat "$1")/stat"; }
bg() { pidf=$1; log=$2; ns=$3; shift 3
  ip netns exec "$ns" sh -c 'echo $$ >"$0"; exec "$@"' "$pidf" "$@" </dev/null >"$log" 2>&1 & }
"""


@dataclass(frozen=True)
class Flow:
    proto: Proto
    family: int  # 4 or 6
    direction: Direction
    port: int

    def __str__(self) -> str:
        arrow = "client->server" if self.direction == "up" else "server->client"
        return f"{self.proto}/ipv{self.family} {arrow} port {self.port}"


@dataclass(frozen=True)
class TransferResult:
    flow: Flow
    nbytes: int  # what the sender had
    received: int
    sent_sha256: str
    received_sha256: str

    @property
    def intact(self) -> bool:
        return self.received == self.nbytes and self.sent_sha256 == self.received_sha256

    def __str__(self) -> str:
        return (
            f"{self.flow}: sent {self.nbytes} B sha256 {self.sent_sha256[:16]}, "
            f"received {self.received} B sha256 {self.received_sha256[:16]}"
        )


@dataclass
class Transfer:
    """One flow's life: :meth:`start`, :meth:`feed`, :meth:`wait_received`, :meth:`close`."""

    host: testinfra.host.Host
    topology: Topology
    flow: Flow
    nbytes: int
    linger0: bool = False  # client closes with SO_LINGER 0: killing it sends a TCP RST
    server_ip: str | None = None  # default: the server's eth0 address of the flow's family
    # where the client connects, when a DNAT on the router maps it to the flow's (listen) port
    connect_port: int | None = None
    client_ip: str | None = None  # the client's source address; default: the kernel's choice
    fed: int = 0
    workdir: str = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = f"{WORK_ROOT}/{self.flow.port}"

    # -- guest commands ------------------------------------------------------------------
    def _sh(self, script: str, timeout: float = 60.0) -> str:
        cmd = f"{_SH_LIB}\nd={self.workdir}\n{script}"
        result = self.host.run(cmd, timeout=timeout)
        if result.rc != 0:
            raise TransferError(
                f"{self.flow}: guest step failed (exit {result.rc}): {result.stderr.strip()}\n"
                f"{self.logs()}"
            )
        return str(result.stdout)

    def logs(self) -> str:
        """The socat logs and progress so far, for error messages."""
        out = self.host.run(
            f'cd {self.workdir} 2>/dev/null && for f in *.log; do echo "== $f"; cat $f; done; '
            f"ls -l {self.workdir} 2>/dev/null"
        )
        return str(out.stdout)

    def _endpoints(self) -> tuple[list[str], list[str]]:
        """socat argv for (server, client); the server always listens."""
        f, port, d = self.flow, self.flow.port, self.workdir
        server_ip = self.server_ip or self.topology.server.address(f.family)

        def socat_host(ip: str) -> str:
            return f"[{ip}]" if f.family == 6 else ip

        fam = "" if f.family == 4 else "6"
        udp = f.proto == "udp"
        listen = f"{f.proto.upper()}{fam}-LISTEN:{port}," + (
            UDP_RCVBUF["listen"] if udp else "reuseaddr"
        )
        connect = (
            f"{f.proto.upper()}{fam}:{socat_host(server_ip)}:{self.connect_port or port}"
            + (f",bind={socat_host(self.client_ip)}" if self.client_ip else "")
            + (f",{UDP_RCVBUF['connect']}" if udp else ",linger=0" if self.linger0 else "")
        )
        fifo, sink = f"OPEN:{d}/in.fifo", f"OPEN:{d}/dst,creat,trunc"
        base = ["socat", f"-T{IDLE_LIMIT}"]
        chunk = [f"-b{UDP_PAYLOAD}"] if f.proto == "udp" else []
        if f.direction == "up":
            return [*base, "-u", listen, sink], [*base, "-u", *chunk, fifo, connect]
        if f.proto == "tcp":
            return [*base, "-u", *chunk, fifo, listen], [*base, "-u", connect, sink]
        # UDP down: the client's first datagram (the "go" file) opens the flow through NAT;
        # -t keeps its socat receiving after that one-byte direction hits EOF.
        return (
            [*base, "-u", *chunk, fifo, listen],
            [*base, f"-t{IDLE_LIMIT}", connect, f"OPEN:{d}/go!!{sink}"],  # read!!write
        )

    def _listen_probe(self) -> tuple[str, str]:
        """(regex, /proc/PID/net file) that matches once the server socket is bound."""
        hexport = f"{self.flow.port:04X}"
        table = self.flow.proto + ("6" if self.flow.family == 6 else "")
        state = " [0-9A-F]*:0000 0A" if self.flow.proto == "tcp" else " "
        return f":{hexport}{state}", table

    def start(self) -> Transfer:
        server, client = self._endpoints()
        regex, table = self._listen_probe()
        srv_ns, cli_ns = self.topology.server.netns, self.topology.client.netns
        sender = "server" if self.flow.direction == "down" else "client"
        # UDP has no retransmission: resolve the neighbours along the path first (one ping of
        # the server's own address: the one the flow is connected to may be a DNAT's), or the
        # first burst overflows the queue of a still unresolved ARP/ND entry and is dropped
        # (seen right after boot, and after a link reset flushed the neighbours)
        server_ip = self.topology.server.address(self.flow.family)
        prime = (
            f"ip netns exec {cli_ns} ping -{self.flow.family} -c 1 -W 5 {server_ip} >/dev/null "
            f'|| echo "warning: no ping reply from {server_ip}" >&2'
            if self.flow.proto == "udp"
            else ""
        )
        self._sh(
            f"""set -e
rm -rf $d; mkdir -p $d
head -c {self.nbytes} /dev/urandom >$d/src
mkfifo $d/in.fifo; printf g >$d/go
sleep {HOLD_LIMIT} >$d/in.fifo 2>/dev/null </dev/null &
echo $! >$d/holder.pid
bg $d/server.pid $d/server.log {srv_ns} {shlex.join(server)}
waitfor 10 listening $d/server.pid {shlex.quote(regex)} {table} || {{
  echo "server did not bind port {self.flow.port}" >&2; exit 1; }}
{prime}
bg $d/client.pid $d/client.log {cli_ns} {shlex.join(client)}
waitfor 10 alive $d/{sender}.pid || {{ echo "sender did not start" >&2; exit 1; }}
""",
            timeout=40,
        )
        return self

    def feed(
        self,
        nbytes: int | None = None,
        background: bool = False,
        pace: float | None = None,
        step: int = 256 * 1024,
    ) -> None:
        """Hand the next ``nbytes`` (default: the rest) of the source to the sender.

        ``pace`` (seconds) spreads the bytes over time, ``step`` bytes then a pause, so that
        something done "while the transfer runs" really happens mid-stream even on a fast
        fast path, and a flow can be kept busy for a given time.
        """
        n = self.nbytes - self.fed if nbytes is None else nbytes
        if n <= 0 or self.fed + n > self.nbytes:
            raise ValueError(f"cannot feed {n} B at offset {self.fed} of {self.nbytes}")
        dd = (
            f"dd if=$d/src of=$d/in.fifo bs=64k iflag=skip_bytes,count_bytes "
            f"skip={self.fed} count={n} status=none"
        )
        if pace is not None:
            dd = (
                f"off={self.fed}; end={self.fed + n}; while [ $off -lt $end ]; do "
                f"c={step}; [ $((end - off)) -lt $c ] && c=$((end - off)); "
                "dd if=$d/src of=$d/in.fifo bs=64k iflag=skip_bytes,count_bytes "
                "skip=$off count=$c status=none || exit 1; "
                f"off=$((off + c)); sleep {pace}; done"
            )
        if background:
            self._sh(f"{dd} </dev/null >$d/feed.log 2>&1 &\necho $! >$d/feed.pid")
        else:
            self._sh(dd, timeout=120)
        self.fed += n

    def received(self) -> int:
        return int(self._sh("size $d/dst").strip())

    def wait_received(self, nbytes: int | None = None, timeout: float = 60.0) -> float:
        """Block until the receiver holds ``nbytes`` (default: all fed); returns guest seconds."""
        want = self.fed if nbytes is None else nbytes
        out = self._sh(
            f"""read a _ </proc/uptime
if ! waitfor {int(timeout)} has $d/dst {want}; then
  echo "received $(size $d/dst) of {want} B within {int(timeout)} s" >&2; exit 1; fi
read b _ </proc/uptime; echo "$a $b"
""",
            timeout=timeout + 30,
        )
        a, b = (float(x) for x in out.split())
        return b - a

    def close(self, timeout: float = 30.0) -> TransferResult:
        """End the flow after the last byte, then compare checksums of both ends.

        TCP: the holder exits, the sender sees EOF and sends FIN, the receiver exits on EOF.
        UDP has no end marker: once every byte is in, the receiver is stopped.
        """
        receiver = "client" if self.flow.direction == "down" else "server"
        stop_udp_receiver = (
            f"waitfor {int(timeout)} has $d/dst {self.fed} || true\n"
            f"kill $(cat $d/{receiver}.pid) 2>/dev/null || true"
        )
        out = self._sh(
            f"""kill $(cat $d/holder.pid) 2>/dev/null || true
{stop_udp_receiver if self.flow.proto == "udp" else ""}
waitfor {int(timeout)} eval '! alive $d/server.pid && ! alive $d/client.pid' || {{
  echo "socat did not exit after close" >&2; exit 1; }}
head -c {self.fed} $d/src | sha256sum | cut -d' ' -f1
sha256sum <$d/dst | cut -d' ' -f1
size $d/dst
""",
            timeout=2 * timeout + 30,
        )
        sent, got, size = out.split()
        return TransferResult(self.flow, self.fed, int(size), sent, got)

    def reset(self) -> None:
        """Abort a TCP flow with a RST from the client (needs ``linger0``)."""
        if self.flow.proto != "tcp" or not self.linger0:
            raise ValueError("reset() needs a TCP transfer started with linger0=True")
        self._sh(
            "kill -KILL $(cat $d/client.pid)\n"
            "waitfor 10 eval '! alive $d/client.pid' || { echo 'client survived' >&2; exit 1; }"
        )

    def stop(self) -> None:
        """Kill whatever is left and remove the work directory (idempotent)."""
        self.host.run(
            f"cd {self.workdir} 2>/dev/null || exit 0; for p in *.pid; do "
            f'[ -e "$p" ] && kill -KILL $(cat "$p") 2>/dev/null; done; cd /; rm -rf {self.workdir}'
        )

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_port() -> int:
    """A port no flow of this test session has used (the server listens on it)."""
    return next(_ports)


class TransferError(AssertionError):
    """A transfer step failed in the guest (with the socat logs)."""


def open_flow(
    host: testinfra.host.Host,
    topology: Topology,
    proto: Proto,
    family: int,
    direction: Direction = "up",
    nbytes: int = 1 << 20,
    linger0: bool = False,
    server_ip: str | None = None,
    port: int | None = None,
    connect_port: int | None = None,
    client_ip: str | None = None,
) -> Transfer:
    """A started transfer on a fresh port (or ``port``, from :func:`new_port`: a rule made
    for the flow before it starts needs it); use as a context manager so it is always cleaned.
    ``client_ip``: the client sends from this address of its own (default: its eth0 address).
    """
    flow = Flow(proto, family, direction, port or new_port())
    transfer = Transfer(
        host, topology, flow, nbytes, linger0, server_ip, connect_port, client_ip=client_ip
    )
    try:
        return transfer.start()
    except BaseException:
        transfer.stop()
        raise


def transfer(
    host: testinfra.host.Host,
    topology: Topology,
    proto: Proto,
    family: int,
    direction: Direction = "up",
    nbytes: int = 1 << 20,
    timeout: float = 60.0,
) -> TransferResult:
    """A whole transfer: start, send everything, wait, close, checksums."""
    with open_flow(host, topology, proto, family, direction, nbytes) as t:
        t.feed()
        t.wait_received(timeout=timeout)
        return t.close()


@dataclass(frozen=True)
class LinkStats:
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int


def link_stats(host: testinfra.host.Host, dev: str, netns: str | None = None) -> LinkStats:
    """Wire-level counters of one interface (frames as the driver saw them, before GRO)."""
    ns = f"-n {netns} " if netns else ""
    [link] = json.loads(host.check_output(f"ip {ns}-j -s link show dev {dev}"))
    s = link["stats64"]
    return LinkStats(s["rx"]["packets"], s["rx"]["bytes"], s["tx"]["packets"], s["tx"]["bytes"])


def _snmp_command(table: str) -> str:
    return f"grep '^{table}:' /proc/net/snmp"


def _snmp_table(text: str) -> dict[str, int]:
    """One /proc/net/snmp table (its header row over its value row, both led by ``Ip:`` ...) as
    name -> value; empty when grep found no rows."""
    rows = text.strip().splitlines()
    if len(rows) < 2:
        return {}
    names, values = (row.split()[1:] for row in rows)
    return dict(zip(names, map(int, values), strict=True))


@dataclass(frozen=True)
class SnmpCounter:
    """One kernel MIB counter of both IP stacks: a column of a /proc/net/snmp table (IPv4) and a
    line of /proc/net/snmp6 (IPv6)."""

    table: str  # /proc/net/snmp table, e.g. "Ip"
    column: str  # its column, e.g. "ForwDatagrams"
    snmp6: str  # the /proc/net/snmp6 line, e.g. "Ip6OutForwDatagrams"
    # the table lists only what happened so far (IcmpMsg: one column per message type seen),
    # so a missing table or column counts 0
    sparse: bool = False

    def command(self, family: int) -> str:
        """The shell command printing the counter's rows."""
        if family == 4:
            return _snmp_command(self.table) + (" || true" if self.sparse else "")
        return f"grep '^{self.snmp6}' /proc/net/snmp6"

    def parse(self, text: str, family: int) -> int:
        if family == 4:
            table = _snmp_table(text)
            return table.get(self.column, 0) if self.sparse else table[self.column]
        return int(text.split()[1])

    def read(self, host: testinfra.host.Host, family: int) -> int:
        return self.parse(host.check_output(self.command(family)), family)


# the ip_forward / ip6_forward packet counter
FORWARDED = SnmpCounter("Ip", "ForwDatagrams", "Ip6OutForwDatagrams")
TOO_BIG_SENT = SnmpCounter("IcmpMsg", "OutType3", "Icmp6OutPktTooBigs", sparse=True)
FRAG_FAILS = SnmpCounter("Ip", "FragFails", "Ip6FragFails")
IN_HDR_ERRORS = SnmpCounter("Ip", "InHdrErrors", "Ip6InHdrErrors")


def forwarded_packets(host: testinfra.host.Host, family: int) -> int:
    """Packets the router forwarded through the classic IP path (ip_forward / ip6_forward).

    The flowtable's fast path transmits from the ingress hook and never reaches it, so this is
    a slow-path meter that does not depend on any nft rule (it still counts after a flush).
    """
    return FORWARDED.read(host, family)


def icmp_too_big_sent(host: testinfra.host.Host, family: int) -> int:
    """ICMP "fragmentation needed" / ICMPv6 "packet too big" the router sent: only the classic
    forwarding path emits them, for packets over the egress MTU."""
    return TOO_BIG_SENT.read(host, family)


def frag_fails(host: testinfra.host.Host, family: int) -> int:
    """Packets the classic forwarding path refused as too big for the egress MTU (each one
    answered with an ICMP too-big, which is rate-limited; this counter is not)."""
    return FRAG_FAILS.read(host, family)


@dataclass(frozen=True)
class Reassembly:
    """IPv4 reassembly counters of one host (/proc/net/snmp): the classic path's view of
    fragments. Conntrack reassembles every fragmented packet before the prerouting hooks
    (nf_defrag_ipv4), so on a router these count the fragments that took the classic path."""

    fragments: int  # ReasmReqds: fragments handed to reassembly
    reassembled: int  # ReasmOKs: packets put back together
    failed: int  # ReasmFails: fragments given up (a missing piece timed out, ...)

    def __sub__(self, other: Reassembly) -> Reassembly:
        return Reassembly(
            self.fragments - other.fragments,
            self.reassembled - other.reassembled,
            self.failed - other.failed,
        )


def reassembly(host: testinfra.host.Host) -> Reassembly:
    ip = _snmp_table(host.check_output(_snmp_command("Ip")))
    return Reassembly(ip["ReasmReqds"], ip["ReasmOKs"], ip["ReasmFails"])


def expired_in_transit(host: testinfra.host.Host, family: int) -> int:
    """Packets the classic forwarding path dropped as header errors, which is where a packet
    whose TTL / hop limit runs out at the router is counted (ip_forward and ip6_forward count
    each one in InHdrErrors; the ICMP time exceeded they answer with is rate-limited)."""
    return IN_HDR_ERRORS.read(host, family)


@dataclass(frozen=True)
class BackupPath:
    """A second router-server link (veth ``wan2`` <-> server ``eth1``) and a service address on
    the server's loopback that is reachable over either link: the primary route goes via
    ``wan`` (metric 10), the backup via ``wan2`` (metric 20), in both directions."""

    router_dev: str = "wan2"
    server_dev: str = "eth1"
    router_ip: str = "203.0.113.1"
    server_ip: str = "203.0.113.2"
    prefix: int = 25
    service_ip: str = "203.0.113.200"  # outside the /25: only routes make it reachable


@contextmanager
def backup_path(host: testinfra.host.Host, topology: Topology) -> Iterator[BackupPath]:
    """Build :class:`BackupPath` for a block; remove every piece of it afterwards (the reset
    script restores links, addresses and default routes, but knows nothing of these; routes
    via the veth vanish with it)."""
    p = BackupPath()
    ns = topology.server.netns
    wan_peer = topology.server.address(4)
    setup = f"""ip link add {p.router_dev} type veth peer name {p.server_dev} netns {ns}
ip addr add {p.router_ip}/{p.prefix} dev {p.router_dev}
ip link set {p.router_dev} up
ip -n {ns} addr add {p.server_ip}/{p.prefix} dev {p.server_dev}
ip -n {ns} link set {p.server_dev} up
ip -n {ns} addr add {p.service_ip}/32 dev lo
ip route add {p.service_ip}/32 via {wan_peer} dev wan metric 10
ip route add {p.service_ip}/32 via {p.server_ip} dev {p.router_dev} metric 20
ip -n {ns} route add default via {p.router_ip} dev {p.server_dev} metric 20
"""
    teardown = f"""ip link del {p.router_dev} 2>/dev/null
ip route del {p.service_ip}/32 metric 10 2>/dev/null
ip -n {ns} addr del {p.service_ip}/32 dev lo 2>/dev/null
true
"""
    try:
        links.change(host, setup, topology.namespaces)  # a veth has carrier once both ends are up
        yield p
    finally:
        host.run(teardown)


@dataclass(frozen=True)
class UnroutedSource:
    """A second IPv6 address on the client's ``eth0``, in a network the router has no route
    to. The router forwards what the client sends from it (forwarding looks at the destination
    only), but a route lookup back to it fails until :meth:`route_back` adds one via the
    client's ``lan`` address. IPv6 only: an IPv4 output lookup with an output interface set
    takes an unroutable destination for on-link (ip_route_output_key_hash_rcu()) and does
    not fail."""

    router: testinfra.host.Host
    endpoints: testinfra.host.Host
    topology: Topology
    address: str = "2001:db8:9::20"
    network: str = "2001:db8:9::/64"

    def _address(self, verb: str) -> str:
        client = self.topology.client
        return f"ip -n {client.netns} -6 addr {verb} {self.address}/128 dev {client.name}"

    def _route(self, verb: str) -> str:
        lan = self.topology.segments[0].router.name
        return f"ip -6 route {verb} {self.network} via {self.topology.client.address(6)} dev {lan}"

    def add(self) -> None:
        self.endpoints.check_output(self._address("add") + " nodad")  # tentative: no bind()

    def route_back(self) -> None:
        """The router learns the way back to :attr:`address` (via the client)."""
        self.router.check_output(self._route("add"))

    def remove(self) -> None:
        """Remove the address and the route back, whichever is there."""
        self.endpoints.run(f"{self._address('del')} 2>/dev/null; true")
        self.router.run(f"{self._route('del')} 2>/dev/null; true")


@contextmanager
def unrouted_source(
    router: testinfra.host.Host, endpoints: testinfra.host.Host, topology: Topology
) -> Iterator[UnroutedSource]:
    """An :class:`UnroutedSource` for a block (the reset between tests restores the
    topology's own addresses and routes, but removes neither this address nor its route)."""
    src = UnroutedSource(router, endpoints, topology)
    src.add()
    try:
        yield src
    finally:
        src.remove()
