"""OpenWrt's firewall (fw4) and its flow offloading, on OpenWrt routers only.

What fw4 does with ``firewall.@defaults[0].flow_offloading`` (openwrt/firewall4,
``templates/ruleset.uc`` and ``root/usr/share/ucode/fw4.uc``): ``1`` adds ``flowtable ft``
(ingress hook, the zones' devices, ``counter``) to ``table inet fw4`` and
``meta l4proto { tcp, udp } flow add @ft`` to chain ``forward``; ``flow_offloading_hw=1`` on
NICs that cannot offload (every emulated one) logs "Hardware flow offloading unavailable,
falling back to software offloading" and leaves ``flags offload`` out; ``0`` means no
flowtable and no rule. LAN->WAN traffic through fw4's masquerade then reaches [OFFLOAD].

Needs a real OpenWrt image (``kmodtest fetch <cell>``); Debian routers skip, since fw4 is
OpenWrt's. The stand-in has no fw4 (vmtests/conftest.py skips it, saying so).
"""

from __future__ import annotations

import pytest

from kmodtest.guest import conntrack as ct
from kmodtest.guest import traffic
from kmodtest.prepare.openwrt import OFFLOAD_PACKAGE, database_path, installed_package

FALLBACK = "Hardware flow offloading unavailable, falling back to software offloading"
OFFLOAD_MODULES = ("nft_flow_offload", "nf_flow_table", "nf_flow_table_inet")
NBYTES = 2_000_000


@pytest.fixture
def openwrt(router):
    if router.cell.openwrt is None:
        pytest.skip(f"fw4 is OpenWrt's firewall; {router.cell.id} is a Debian router")
    return router


@pytest.fixture
def fw4(openwrt, host):
    """Set fw4's offload options, restart it, hand back ``nft list table inet fw4``."""

    def configure(offloading: int, hw: int = 0) -> str:
        host.check_output(
            "uci set firewall.@defaults[0].flow_offloading=%s; "
            "uci set firewall.@defaults[0].flow_offloading_hw=%s; uci commit firewall; "
            "/etc/init.d/firewall restart",
            str(offloading),
            str(hw),
        )
        return host.check_output("nft list table inet fw4")

    yield configure
    host.run("/etc/init.d/firewall stop")  # the suite's other tests own the ruleset


def test_kmod_nft_offload_is_installed_and_loaded(openwrt, host, record_property):
    manager = openwrt.image.packages
    database = host.file(database_path(manager)).content_string
    package = installed_package(database, manager, OFFLOAD_PACKAGE)
    assert package is not None, f"{OFFLOAD_PACKAGE} is not in {database_path(manager)}"
    record_property("kmod_nft_offload_installed", package.version)
    for module in OFFLOAD_MODULES:
        host.run("modprobe %s", module)
        assert host.file(f"/sys/module/{module}").is_directory, f"{module} is not loaded"


def test_flow_offloading_adds_flowtable_and_forward_rule(fw4, host):
    table = fw4(1)
    assert "flowtable ft {" in table, table
    flowtable = table.split("flowtable ft {", 1)[1].split("}", 1)[0]
    assert "hook ingress priority filter" in flowtable
    assert "counter" in flowtable
    assert "flags offload" not in flowtable
    devices = flowtable.split("devices = {", 1)[1].split("}", 1)[0].replace('"', "")
    assert {"lan", "wan"} <= {d.strip() for d in devices.split(",")}, flowtable
    forward = table.split("chain forward {", 1)[1]
    assert "meta l4proto { tcp, udp } flow add @ft" in forward, forward


def test_hw_offload_on_emulated_nics_falls_back_to_software(fw4, host):
    table = fw4(1, hw=1)
    assert "flowtable ft {" in table, table
    assert "flags offload" not in table
    assert FALLBACK in host.check_output("logread")


def test_flow_offloading_off_means_no_flowtable(fw4):
    table = fw4(0)
    assert "flowtable" not in table
    assert "flow add" not in table


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_lan_to_wan_through_masquerade_is_offloaded(fw4, router, host, endpoints, proto):
    fw4(1)
    topo = router.topology
    wan = topo.segments[1].router
    with traffic.open_flow(endpoints, topo, proto, 4, "up", NBYTES) as t:
        t.feed()
        t.wait_received()
        entry = ct.the_entry(ct.proc_entries(host), proto, t.flow.port)
        result = t.close()
    assert entry.offloaded, f"/proc shows no [OFFLOAD]:\n{entry.raw}{ct.state_report(host)}"
    assert not entry.hw_offloaded, entry.raw
    assert entry.reply.dst == wan.address(4), f"not masqueraded to {wan.address(4)}: {entry.raw}"
    assert result.intact, str(result)
