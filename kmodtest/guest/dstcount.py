"""The kernel's own count of live IPv4 routes (dst entries): where a route reference that
nobody drops shows on a stock kernel, without kmemleak.

Every IPv4 route the kernel allocates (``dst_alloc``) adds one to ``ipv4_dst_ops``' counter,
and the release of its last reference (``dst_release``) takes it off again
(``net/core/dst.c``). ``/proc/net/stat/rt_cache`` prints it, exact (``dst_entries_get_slow``:
the per-CPU sum), as the first column ("entries", hex) of every row; it is one counter for
*all* network namespaces (``net/ipv4/route.c`` ``rt_cpu_seq_show``).

A flowtable flow holds a reference on the routes it transmits with, and those are the routes
cached in the FIB's nexthops (``nhc_rth_input``, ``nhc_pcpu_rth_output``), shared by every flow
and packet on the path: a leaked reference changes no count while its route stays cached. It
shows once the cache lets go of the route (here: the FIB entry is deleted): without the leak the
route is freed and the count drops, with it the route lives on and stays counted.

IPv6 has no such view: ``/proc/net/rt6_stats``' 6th field counts ``ip6_dst_ops``, but the
per-CPU routes of the FIB, the ones flows hold, are allocated ``DST_NOCOUNT``
(``net/ipv6/route.c`` ``ip6_rt_pcpu_alloc``); it stays 0 through offloaded IPv6 flows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import testinfra.host

from kmodtest.guest.topology import Topology

COUNTER_FILE = "/proc/net/stat/rt_cache"
# shell: the count into $n (hex), with builtins only (an exec costs tens of ms under TCG)
_READ = f"{{ read _; read n _; }} <{COUNTER_FILE}"


def quiet_ipv4_dst_entries(host: testinfra.host.Host, reads: int = 10, pause: float = 0.1) -> int:
    """The count without transients: the lowest of ``reads`` readings ``pause`` s apart.

    A packet in flight may hold a route of its own (an uncached one), which only ever adds to
    the count for a moment.
    """
    out = host.check_output(
        f'for i in $(seq {reads}); do {_READ}; echo "$((0x$n))"; sleep {pause}; done'
    )
    return min(int(v) for v in out.split())


@contextmanager
def router_ipv4_routes_removed(host: testinfra.host.Host, topology: Topology) -> Iterator[None]:
    """The router without its IPv4 addresses on its ports, for a block; then back.

    With an address go its prefix, local and broadcast routes, their fib_info, and with it
    every route cached in its nexthop, on every CPU: what stays counted then is what something
    else still holds a reference on.
    """
    addrs = [(p.ipv4, p.name) for p in topology.router_ports]
    host.check_output("; ".join(f"ip -4 addr del {a} dev {d}" for a, d in addrs))
    try:
        yield
    finally:
        host.check_output("; ".join(f"ip -4 addr replace {a} dev {d}" for a, d in addrs))


def wait_ipv4_dst_entries(
    host: testinfra.host.Host, target: int, timeout: int
) -> tuple[int, float]:
    """Poll (guest clock) until the count is down to ``target``, at most ``timeout`` s; returns
    the last count and the seconds waited. Routes die late: a flow's references go when the
    flowtable's GC (once a second) frees it, a fib_info's routes after an RCU grace period."""
    out = host.check_output(
        f"read a _ </proc/uptime; end=$(( ${{a%.*}} + {timeout} ))\n"
        f"while :; do {_READ}; [ $((0x$n)) -le {target} ] && break; read u _ </proc/uptime; "
        "[ ${u%.*} -lt $end ] || break; sleep 0.1; done\n"
        'read b _ </proc/uptime; echo "$((0x$n)) $a $b"'
    )
    count, start, end = out.split()
    return int(count), float(end) - float(start)
