"""A flow that keeps carrying traffic stays in the flowtable, however long it lives: every
packet on the fast path pushes its timeout (``nf_flowtable_<proto>_timeout``) forward. Only a
flow that idles leaves (test_conntrack_handover.py); one that left while busy would hand its
packets to the classic path again and again, each time until the next ``flow add``.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import traffic
from kmodtest.guest.rulesets import router_ruleset, sample_paths

pytestmark = pytest.mark.per_nic

FLOW_TIMEOUT = 2  # seconds: the flowtable timeout during the test
STEP = 32 * 1024  # bytes the client sends at a time ...
PAUSE = 0.3  # ... then it pauses (s): far less than the timeout, never idle long enough
STEPS = 24  # ~7 s of guest time at least: more than three timeouts
FIRST = 256 * 1024  # sent at once to get the flow offloaded before the busy stretch


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
