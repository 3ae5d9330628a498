"""Flowtable flags on emulated NICs: ``offload`` is refused atomically, ``counter`` feeds
conntrack's per-flow counters, and fw4's hardware probe falls back to the software flowtable.

Emulated NICs (virtio-net, e1000) have no ``ndo_setup_tc`` flowtable support, so the kernel
must refuse ``flags offload`` with EOPNOTSUPP when it asks the driver to bind; [HW_OFFLOAD]
needs a passthrough NIC, which this matrix does not have.
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import traffic
from kmodtest.guest.rulesets import (
    HW_PROBE_TABLE,
    check,
    hw_offload_probe_ruleset,
    router_ruleset,
    sample_paths,
)
from kmodtest.nics import NICS
from kmodtest.prepare.openwrt import OpenWrtImage

pytestmark = pytest.mark.per_nic

NBYTES = 2_000_000
EOPNOTSUPP = "Operation not supported"
# guest drivers that bind flowtables in hardware (ndo_setup_tc TC_SETUP_FT)
HW_OFFLOAD_DRIVERS = {"mlx5_core", "mtk_eth_soc"}


def emulated_only(router) -> None:
    """Refusal is what emulated NICs must do; a passthrough NIC's driver may accept the flag."""
    if router.topology.passthrough_ports:
        pytest.skip(
            "passthrough NIC: whether `flags offload` is accepted is its driver's call "
            "(test_hw_offload_on_passthrough_nic checks the accepted case)"
        )


def test_offload_flag_is_refused_and_ruleset_unchanged(router, nft):
    emulated_only(router)
    # something already loaded, which the failed batch must leave exactly as it was
    assert nft.apply(router_ruleset(flowtable=False, table="kt_base")).rc == 0
    before = nft.ruleset()

    result = nft.apply(router_ruleset(offload=True))

    assert result.rc != 0, "flags offload accepted on an emulated NIC"
    assert EOPNOTSUPP in result.stderr, result.stderr
    assert "flowtable ft" in result.stderr, f"error not pinned on the flowtable:\n{result.stderr}"
    # atomic: the table, counter and chains of the same batch were not committed either
    assert nft.ruleset() == before
    assert nft.flowtables() == []


# each family has its own fast-path function, and each updates the counters itself
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_counter_flag_puts_fast_path_traffic_in_conntrack_counters(
    router, host, endpoints, nft, family
):
    """Offloaded packets skip conntrack; only ``counter`` makes the flowtable account them."""
    openwrt = isinstance(router.image, OpenWrtImage)
    seen = {}
    with ct.sysctls(host, {"net.netfilter.nf_conntrack_acct": 1}):
        for counter in (False, True):
            host.check_output("nft flush ruleset; conntrack -F 2>/dev/null || true")
            assert nft.apply(router_ruleset(counter=counter)).rc == 0
            listed = nft.run("list flowtable inet kt ft").stdout
            assert ("counter" in listed) == counter, listed
            with traffic.open_flow(endpoints, router.topology, "tcp", family, "up", NBYTES) as t:
                t.feed()
                t.wait_received()
                entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
                # a stock OpenWrt image has no conntrack tool: /proc alone there
                tool = None if openwrt else ct.the_entry(ct.tool_entries(host), "tcp", t.flow.port)
                assert t.close().intact
            assert entry.offloaded, f"{entry.raw}{ct.state_report(host)}"
            assert entry.orig.bytes is not None, entry.raw
            if tool is not None:  # conntrack -L reads the same counters (a moment later)
                assert tool.orig.bytes is not None, tool.raw
                assert abs(tool.orig.bytes - entry.orig.bytes) <= 1500, f"{tool.raw}\n{entry.raw}"
            seen[counter] = entry

    plain, counted = seen[False], seen[True]
    report = f"\nwithout counter: {plain.raw}\nwith counter:    {counted.raw}"
    # without the flag, conntrack only saw the handshake and the packets before offload
    assert plain.orig.bytes is not None and plain.orig.bytes * 20 < NBYTES, report
    # with it, the original direction carries the whole payload plus headers, and the
    # reply direction (ACKs) is counted too
    assert counted.orig.bytes is not None and NBYTES <= counted.orig.bytes < NBYTES * 1.2, report
    assert counted.reply.packets and counted.reply.packets > plain.reply.packets, report


def test_fw4_probe_finds_no_hw_offload_and_software_flowtable_is_used(router, host, endpoints, nft):
    emulated_only(router)
    probe = check(nft, hw_offload_probe_ruleset(offload=True))
    assert probe.rc != 0, "nft -c accepted flags offload: fw4 would enable hardware offload"
    assert EOPNOTSUPP in probe.stderr, probe.stderr
    # the same probe without the flag passes: the refusal is the driver's, not a syntax error
    control = check(nft, hw_offload_probe_ruleset(offload=False))
    assert control.rc == 0, control.stderr
    assert HW_PROBE_TABLE not in nft.ruleset(), "nft -c committed something"

    # what fw4 does next: the same flowtable without the flag
    assert nft.apply(router_ruleset(offload=False)).rc == 0
    before = sample_paths(nft, 4)
    with traffic.open_flow(endpoints, router.topology, "tcp", 4, "up", NBYTES) as t:
        t.feed()
        t.wait_received()
        during = sample_paths(nft, 4) - before
        entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
        result = t.close()
    report = f"{during}\n{entry.raw}{ct.state_report(host)}"
    assert entry.offloaded and not entry.hw_offloaded, report
    assert during.mostly_offloaded(NBYTES), report
    assert result.intact, str(result)


def test_hw_offload_on_passthrough_nic(router, host, endpoints, nft):
    nic = router.topology.nic_model
    if nic in NICS:
        pytest.skip(
            f"[HW_OFFLOAD] needs a passthrough NIC whose driver binds flowtables "
            f"(ndo_setup_tc TC_SETUP_FT, e.g. mlx5, mtk_eth); this cell's router ports are "
            f"QEMU-emulated {nic} ({NICS[nic].driver}); a passthrough case (--passthrough or a "
            f"cell's passthrough:, README) runs it"
        )
    driver = host.check_output("basename $(readlink /sys/class/net/lan/device/driver)")
    applied = nft.apply(router_ruleset(offload=True))
    if driver not in HW_OFFLOAD_DRIVERS:  # refused, per the driver, like an emulated NIC
        assert applied.rc != 0 and EOPNOTSUPP in applied.stderr, f"{driver}: {applied.stderr}"
        return
    assert applied.rc == 0, f"{driver}: {applied.stderr}"
    with traffic.open_flow(endpoints, router.topology, "tcp", 4, "up", NBYTES) as t:
        t.feed()
        t.wait_received()
        entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
        result = t.close()
    assert entry.hw_offloaded, f"{entry.raw}{ct.state_report(host)}"
    assert result.intact, str(result)
