"""A flow that keeps carrying traffic stays in the flowtable, however long it lives: every
packet on the fast path pushes its timeout (``nf_flowtable_<proto>_timeout``) forward. Only a
flow that idles leaves (test_conntrack_handover.py); one that left while busy would hand its
packets to the classic path again and again, each time until the next ``flow add``.

A flow that ended must leave nothing behind: the route references it held go with it, or a
router that runs for months keeps every route a flow ever used (kmodtest/guest/dstcount.py).
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import dstcount, traffic
from kmodtest.guest.rulesets import router_ruleset, sample_paths

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
