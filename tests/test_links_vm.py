"""The link wait (kmodtest/guest/links.py) against real guest drivers: it returns only once
every up link has carrier again, and names the link that never gets it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kmodtest.guest import links
from kmodtest.guest.router import Router
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.pool import RouterPool


def test_wait_names_an_up_link_that_never_gets_carrier(router, host):
    # a veth whose peer stays down: administratively up, no carrier, forever
    host.check_output("ip link add kt-lonely type veth peer name kt-peer; ip link set kt-lonely up")
    try:
        with pytest.raises(links.LinkError, match=r"no carrier on kt-lonely after 2 s"):
            links.change(host, "true", router.topology.namespaces, timeout=2)
        links.change(host, "ip link set kt-peer up", router.topology.namespaces)
        assert host.check_output("cat /sys/class/net/kt-lonely/carrier") == "1"
    finally:
        host.run("ip link del kt-lonely")


def test_wait_sees_links_in_the_endpoint_namespaces(router, host):
    host.check_output("ip -n server link add kt-lonely type veth peer name kt-peer")
    try:
        host.check_output("ip -n server link set kt-lonely up")
        with pytest.raises(links.LinkError, match=r"no carrier on server/kt-lonely after 2 s"):
            links.change(host, "true", router.topology.namespaces, timeout=2)
    finally:
        host.run("ip -n server link del kt-lonely")


@pytest.fixture
def e1000e_router(kmodtest_session, tmp_path) -> Iterator[Router]:
    """A router on e1000e, the model whose link an MTU change resets (QEMU 7.2 emulation)."""
    cell = kmodtest_session.cells[0]
    if "e1000e" not in cell.spec.nics:
        pytest.skip(f"cell {cell.id} lists no e1000e NIC")
    kmodtest_session.pool.stop_current()  # one VM at a time
    pool = RouterPool(kmodtest_session.pool.images, tmp_path / "logs", accel="auto")
    try:
        yield pool.acquire(VmCase(cell, "e1000e"))
    finally:
        pool.close()


def test_mtu_change_resets_e1000e_link_and_the_wait_outlasts_it(e1000e_router):
    host = e1000e_router.host
    # the hazard itself: right after the MTU change the port has no carrier
    assert host.check_output("ip link set dev wan mtu 1400; cat /sys/class/net/wan/carrier") == "0"
    links.change(host, "ip link set dev wan mtu 1280", e1000e_router.topology.namespaces)
    carrier = host.check_output("cat /sys/class/net/wan/carrier /sys/class/net/lan/carrier")
    assert carrier.split() == ["1", "1"]
    # one packet, no retry: it crosses at once
    ping = host.run("ip netns exec client ping -c 1 -W 2 -s 1200 198.51.100.2")
    assert ping.rc == 0, ping.stdout + ping.stderr
