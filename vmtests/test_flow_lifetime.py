"""A flow that keeps carrying traffic stays in the flowtable, however long it lives: every
packet on the fast path pushes its timeout (``nf_flowtable_<proto>_timeout``) forward. Only a
flow that idles leaves (test_conntrack_handover.py); one that left while busy would hand its
packets to the classic path again and again, each time until the next ``flow add``.

Its conntrack entry lives as long: a packet of the flow that the fast path leaves to the
classic path cuts the entry's timeout to the protocol's, and the entry must get its long one
back before that runs out (who gives it back, per kernel: FLOWTABLE_GC_EXTENDS_SINCE).

A flow that ended must leave nothing behind: the route references it held go with it, or a
router that runs for months keeps every route a flow ever used (kmodtest/guest/dstcount.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import testinfra.host

from kmodtest.guest import conntrack as ct
from kmodtest.guest import dstcount, traffic, wire
from kmodtest.guest.nft import Nft
from kmodtest.guest.rulesets import PathSample, router_ruleset, sample_paths
from kmodtest.guest.topology import Topology

pytestmark = pytest.mark.per_nic

FLOW_TIMEOUT = 2  # seconds: the flowtable timeout during the test
STEP = 32 * 1024  # bytes the client sends at a time ...
PAUSE = 0.3  # ... then it pauses (s): far less than the timeout, never idle long enough
STEPS = 24  # ~7 s of guest time at least: more than three timeouts
FIRST = 256 * 1024  # sent at once to get the flow offloaded before the busy stretch
ENDED_FLOWS = 3  # offloaded TCP flows that end (each held two routes: one per direction)
ENDED_BYTES = 256 * 1024
HANDBACK_WAIT = 30  # s: a FIN tears the flow down at once (6.14+: after FLOW_TIMEOUT of idle)
RELEASE_WAIT = 15  # s (guest clock): the flowtable GC frees a torn-down flow within ~1 s


def _guest_uptime(host) -> float:
    return float(host.check_output("cat /proc/uptime").split()[0])


def test_busy_flow_outlives_its_timeout_in_the_flowtable(router, host, endpoints, nft):
    assert nft.apply(router_ruleset()).rc == 0
    sysctl = {"net.netfilter.nf_flowtable_tcp_timeout": FLOW_TIMEOUT}
    with (
        ct.sysctls(host, sysctl),
        traffic.open_flow(endpoints, router.topology, "tcp", 4, "up", FIRST + STEP * STEPS) as t,
    ):
        t.feed(FIRST)
        t.wait_received()
        first = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
        start = _guest_uptime(host)
        before = sample_paths(nft, 4)
        t.feed(pace=PAUSE, step=STEP)
        t.wait_received()
        during = sample_paths(nft, 4) - before
        busy = _guest_uptime(host) - start
        entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
        result = t.close()

    report = f"{t.flow}, busy for {busy:.1f} s (guest clock): {during}\n{entry.raw}"
    assert first.offloaded, f"not offloaded before the busy stretch: {first.raw}"
    assert busy > 3 * FLOW_TIMEOUT, f"the flow was not kept busy past its timeout: {report}"
    # once offloaded, no packet of the flow, in either direction, may take the forward chain:
    # one that does means the flow had left the flowtable (its timeout was not refreshed)
    assert during.slowpath.packets == 0 and during.forwarded == 0, (
        f"a busy flow left the flowtable (nf_flowtable_tcp_timeout {FLOW_TIMEOUT} s): {report}"
    )
    assert entry.offloaded, f"a busy flow is no longer offloaded: {report}"
    assert result.intact, str(result)


# --- a packet the fast path leaves to the classic path must not cut the entry's life short ----
#
# A packet of an offloaded flow that the fast path does not take (TTL 1 here; IP options and
# fragments do the same) goes through conntrack, which refreshes the entry to the protocol's
# timeout (nf_conntrack_udp_packet -> nf_ct_refresh_acct: nf_conntrack_udp_timeout_stream, or
# nf_conntrack_udp_timeout in a stream's first 2 s), down from the day flow_offload_add() gave
# it. Fast-path packets never touch that timeout, so unless something gives the day back, the
# entry expires while the flow is busy: conntrack evicts it (at the next lookup, listing or GC
# scan), the flowtable tears the flow down, and its next packet starts a new entry (a new id,
# counters from zero, a NAT mapping that may differ; ``conntrack -E`` shows DESTROY).
#
# What gives the day back differs per kernel (read in each kernel's own linux-source):
# - 6.1.192: conntrack's gc_worker() (nf_conntrack_core.c) calls nf_ct_offload_timeout() on each
#   offloaded entry it passes (a day, once below half a day), on its own scan, which reschedules
#   itself up to GC_SCAN_INTERVAL_MAX (60 s) later. The stock nf_conntrack_udp_timeout_stream
#   (120 s) outlasts that. The test does not wait a minute for it, nor lowers that sysctl (tried
#   on 6.1.0-57: the entry expired 3 s after the TTL-1 datagrams and a new one took its place,
#   as on 6.12 without the flowtable's extension); there it checks only that conntrack took the
#   TTL-1 datagrams on the entry and left it offloaded.
# - 6.12.118 and 7.2.13: upstream 03428ca5cee9 (FLOWTABLE_GC_CHANGE, Florian Westphal) moved it
#   to the flowtable's GC, which runs every second: nf_flow_offload_gc_step() ->
#   nf_flow_table_extend_ct_timeout(), a day back (UDP) once below 5 minutes; gc_worker() no
#   longer looks at offloaded entries. Both sources carry the later fix "netfilter: flowtable:
#   fix offloaded ct timeout never being extended" (its cmpxchg compared the absolute
#   ct->timeout with a relative value, so it never matched): that bug fails this test, as does
#   a negated offload check in nf_flow_table_extend_ct_timeout().
#
# The timeout itself cannot be read while the entry is offloaded: ctnetlink_dump_info() leaves
# it out (so ``conntrack -L`` prints none, in any format) and so does /proc. What can be seen
# is what a user sees: an entry is listed only while it has not expired (a listing evicts an
# expired one), so the same entry, same id, still listed after the cut timeout has run out is
# one whose timeout was extended. With nf_conntrack_acct on (and no flowtable counter flag),
# only the classic path counts packets on the entry: the TTL-1 datagrams show up there, proof
# that conntrack matched them to the entry and refreshed it.
FLOWTABLE_GC_EXTENDS_SINCE = (6, 12)
FLOWTABLE_GC_CHANGE = "netfilter: conntrack: rework offload nf_conn timeout extension logic"
UDP_CT_TIMEOUTS = (
    "net.netfilter.nf_conntrack_udp_timeout",  # the refresh in a stream's first 2 s
    "net.netfilter.nf_conntrack_udp_timeout_stream",  # the refresh after that
)
SHORT_CT_TIMEOUT = 3  # s: both sysctls during the test (6.12+): 3 runs of the flowtable GC
PAST_SHORT = 1.0  # s: the entry must still be listed this long after the short timeout ran out
EXPIRING = 4  # datagrams sent down the offloaded flow with TTL 1
FIRST = 100 * traffic.UDP_PAYLOAD  # whole datagrams only, so the TTL-1 ones are exactly those
BUSY_STEP = 10 * traffic.UDP_PAYLOAD  # while it is watched the flow carries this much ...
BUSY_PAUSE = 0.2  # ... then pauses (s)
BUSY_STEPS = 30  # >= 6 s of guest time: busy past SHORT_CT_TIMEOUT + PAST_SHORT


@dataclass(frozen=True)
class CtSample:
    """The flow's entries from ``conntrack -L -o id`` (/proc prints no id), at a guest time
    (seconds after the TTL-1 datagrams)."""

    at: float
    entries: list[ct.Entry] = field(default_factory=list)

    def entry(self, entry_id: str) -> ct.Entry | None:
        return next((e for e in self.entries if e.fields.get("id") == entry_id), None)

    def __str__(self) -> str:
        shown = "; ".join(
            f"id={e.fields.get('id')}{' [OFFLOAD]' if e.offloaded else ' (not offloaded)'}"
            f" {e.reply.packets} reply packets counted"
            for e in self.entries
        )
        return f"t{self.at:+.1f} s: {shown or 'no entry'}"


def _ct_sample(host: testinfra.host.Host, port: int, since: float = 0.0) -> CtSample:
    """The UDP entries with ``port`` on either side of their original tuple (a flow re-created
    from the server's side has it as the source), and the guest's uptime, in one round trip."""
    out = host.check_output("cat /proc/uptime; conntrack -L -f ipv4 -p udp -o id 2>/dev/null")
    uptime, _, listing = out.partition("\n")
    entries = [e for e in ct.parse_table(listing) if port in (e.orig.sport, e.orig.dport)]
    return CtSample(float(uptime.split()[0]) - since, entries)


def _send_expiring(
    host: testinfra.host.Host, endpoints: testinfra.host.Host, topo: Topology, t: traffic.Transfer
) -> tuple[int, int]:
    """EXPIRING datagrams of the flow, sent by the server with TTL 1 (the fast path leaves them
    to the classic path: conntrack sees them, ip_forward drops them); (sent, counted as
    expired in transit by the router)."""
    before = traffic.expired_in_transit(host, 4)
    match = f"udp sport {t.flow.port}"
    with wire.rewrite_sent(endpoints, topo.server.netns, match, "ip ttl set 1") as rewritten:
        t.feed(EXPIRING * traffic.UDP_PAYLOAD)
        sent = wire.poll_count(rewritten, EXPIRING)
        expired = wire.poll_count(lambda: traffic.expired_in_transit(host, 4) - before, sent)
    return sent, expired


def _watch_busy_flow(
    host: testinfra.host.Host, nft: Nft, t: traffic.Transfer, since: float
) -> tuple[list[CtSample], PathSample]:
    """Keep the flow busy, and list its entries until PAST_SHORT after the short timeout ran
    out (guest clock); (the listings, the router's paths meanwhile)."""
    before = sample_paths(nft, 4)
    t.feed(BUSY_STEPS * BUSY_STEP, background=True, pace=BUSY_PAUSE, step=BUSY_STEP)
    samples = [_ct_sample(host, t.flow.port, since)]
    while samples[-1].at < SHORT_CT_TIMEOUT + PAST_SHORT:
        time.sleep(0.3)
        samples.append(_ct_sample(host, t.flow.port, since))
    return samples, sample_paths(nft, 4) - before


def test_slow_path_packet_does_not_cut_an_offloaded_entry_short(router, host, endpoints, nft):
    """A busy UDP flow, server -> client (so its entry has seen a reply: a stream), offloaded;
    datagrams of it sent with TTL 1 take the classic path, which cuts its conntrack timeout to
    the protocol's (lowered to SHORT_CT_TIMEOUT). The same entry must still be there, offloaded,
    after that has run out: its long timeout was given back in time."""
    assert nft.apply(router_ruleset()).rc == 0
    kernel = router.image.kernel_version
    flowtable_gc = router.image.kernel_series >= FLOWTABLE_GC_EXTENDS_SINCE
    topo = router.topology
    total = FIRST + EXPIRING * traffic.UDP_PAYLOAD + BUSY_STEPS * BUSY_STEP
    short = dict.fromkeys(UDP_CT_TIMEOUTS, SHORT_CT_TIMEOUT) if flowtable_gc else {}
    with (
        ct.sysctls(host, {"net.netfilter.nf_conntrack_acct": 1}),
        traffic.open_flow(endpoints, topo, "udp", 4, "down", total) as t,
    ):
        t.feed(FIRST)
        t.wait_received()
        first = _ct_sample(host, t.flow.port)
        assert len(first.entries) == 1 and first.entries[0].offloaded, (
            f"{t.flow}: not one offloaded entry: {first}{ct.state_report(host)}"
        )
        with ct.sysctls(host, short):
            timeouts = {n: int(ct.read_sysctl(host, n)) for n in UDP_CT_TIMEOUTS}
            sent, expired = _send_expiring(host, endpoints, topo, t)
            cut = _ct_sample(host, t.flow.port)
            since = cut.at
            cut = CtSample(0.0, cut.entries)
            if flowtable_gc:
                samples, during = _watch_busy_flow(host, nft, t, since)

    entry = first.entries[0]
    entry_id = entry.fields.get("id", "")
    assert entry_id, f"conntrack -o id printed no id: {entry.raw}"
    report = (
        f"kernel {kernel}, {t.flow}, UDP conntrack timeouts {timeouts}; the entry before:\n"
        f"  {entry.raw}\nafter the TTL-1 datagrams (guest clock):\n  {cut}"
    )
    assert sent == EXPIRING and expired == sent, (
        f"{sent} of {EXPIRING} datagrams sent with TTL 1, {expired} counted as expired in "
        f"transit by the router: not all took the classic path: {report}"
    )
    refreshed = cut.entry(entry_id)
    assert refreshed is not None and refreshed.offloaded, (
        f"the entry did not stay offloaded through the TTL-1 datagrams: {report}"
    )
    assert (refreshed.reply.packets or 0) - (entry.reply.packets or 0) == sent, (
        f"conntrack did not count the {sent} TTL-1 datagrams on the entry (nf_conntrack_acct), "
        f"so it did not refresh it with them either: {report}"
    )
    if not flowtable_gc:
        return  # 6.1: gc_worker gives the day back on its own scan, up to 60 s later (above)

    report += "".join(f"\n  {s}" for s in samples[1:]) + f"\nthe router's paths: {during}"
    last = samples[-1]
    kept = last.entry(entry_id)
    assert kept is not None and kept.offloaded and len(last.entries) == 1, (
        f"the busy flow's conntrack entry id={entry_id} did not outlive the {SHORT_CT_TIMEOUT} s "
        f"timeout the classic path had cut it to: it did not get its long timeout back in time "
        f"(expected since '{FLOWTABLE_GC_CHANGE}': the flowtable GC, every 1 s): {report}"
    )
    assert during.rx_packets >= BUSY_STEP // traffic.UDP_PAYLOAD, (
        f"the flow carried nothing while it was watched: {report}"
    )
    assert during.slowpath.packets == 0 and during.forwarded == 0, (
        f"packets of the busy flow took the classic path after the TTL-1 datagrams: {report}"
    )


def _offloaded_flow_that_ends(router, host, endpoints) -> traffic.TransferResult:
    """One TCP flow, offloaded while it carries its bytes, closed with FINs, then waited for
    until the flowtable has handed it back to conntrack (torn down: the GC frees it next)."""
    with traffic.open_flow(endpoints, router.topology, "tcp", 4, "up", ENDED_BYTES) as t:
        t.feed()
        t.wait_received()
        entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
        assert entry.offloaded, f"{t.flow}: not offloaded, so it held no routes: {entry.raw}"
        result = t.close()
        ct.wait_entry(host, "tcp", t.flow.port, ct.in_classic_path, HANDBACK_WAIT, "hand-back")
    return result


def test_ended_flows_release_their_routes(router, host, endpoints, nft):
    """The live-route count with the router's routes removed is the same before and after
    offloaded flows that ended: each flow's references on its two routes went with it.

    IPv4 only: the kernel counts no IPv6 route a flow holds (kmodtest/guest/dstcount.py); the
    release is one code path for both families (nft_flow_dst_release).
    """
    topology = router.topology
    # the classic path fills the endpoints' route caches, which the count includes (their
    # output routes are cached per CPU: with one emulated CPU, the cells' default, the flows
    # below find them all filled; with more, one could fill another CPU's slot: +1)
    warm = traffic.transfer(endpoints, topology, "tcp", 4, "up", ENDED_BYTES)
    assert warm.intact, str(warm)
    with dstcount.router_ipv4_routes_removed(host, topology):
        baseline = dstcount.quiet_ipv4_dst_entries(host)
    assert nft.apply(router_ruleset()).rc == 0
    sysctl = {"net.netfilter.nf_flowtable_tcp_timeout": FLOW_TIMEOUT}
    with ct.sysctls(host, sysctl):
        results = [_offloaded_flow_that_ends(router, host, endpoints) for _ in range(ENDED_FLOWS)]
    with dstcount.router_ipv4_routes_removed(host, topology):
        after, waited = dstcount.wait_ipv4_dst_entries(host, baseline, RELEASE_WAIT)

    assert after == baseline, (
        f"live IPv4 routes ({dstcount.COUNTER_FILE}) with the router's lan/wan addresses "
        f"removed: {baseline} before, {after} after {ENDED_FLOWS} offloaded TCP flows ended "
        f"(FIN, handed back to conntrack), {waited:.1f} s later (guest clock): "
        + (
            f"{after - baseline} route(s) still referenced: the flows did not release their "
            "routes (tuple.dst_cache) when they were freed"
            if after > baseline
            else "routes counted in the baseline were freed since: the baseline was not quiet"
        )
    )
    assert all(r.intact for r in results), "\n".join(map(str, results))
