"""Two-VM labs: each VM gets its half of the test network's NICs and scripts, no more."""

from __future__ import annotations

from pathlib import Path

from kmodtest.guest.openwrt_net import plain_router_script, uci_router_script
from kmodtest.guest.topology import Topology


def test_the_halves_split_the_nics_between_router_and_endpoints():
    topology = Topology("virtio-net-pci")
    lab = Path("/tmp/kt-lab")
    router, endpoints = topology.router_nics(lab), topology.endpoint_nics(lab)
    assert [n.name for n in router] == ["lan", "wan"]
    assert [n.name for n in endpoints] == ["lan-client", "wan-server"]
    assert set(router) | set(endpoints) == set(topology.nics(lab))
    # each cable's two ends are the same pair of sockets, crossed
    for r, e in zip(router, endpoints, strict=True):
        assert (r.link.local, r.link.remote) == (e.link.remote, e.link.local)


def test_each_vm_runs_only_its_half_of_the_scripts():
    topology = Topology("virtio-net-pci")
    router = topology.setup_script(endpoints=False)
    endpoints = topology.setup_script(router=False)
    assert "ip netns" not in router and "ip -n " not in router
    assert "name lan" in router and "nft flush ruleset" in router
    assert "ip netns add client" in endpoints and "ip netns add server" in endpoints
    assert "name lan\n" not in endpoints and "nft flush ruleset" not in endpoints
    assert "ip netns add client" in topology.setup_script()


def test_openwrt_router_scripts_name_the_ports_by_mac_and_address_them():
    topology = Topology("e1000e")
    for script in (uci_router_script(topology), plain_router_script(topology)):
        for port in topology.router_ports:
            assert port.mac in script and f"name {port.name}" in script
    uci = uci_router_script(topology)
    assert "uci commit network" in uci
    assert "set network.lan.ipaddr=192.0.2.1" in uci
    assert "ubus -t 60 wait_for network.interface.lan network.interface.wan" in uci
    assert "ip addr add 198.51.100.1/24 dev wan" in plain_router_script(topology)
