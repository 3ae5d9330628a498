"""When offload cannot happen, forwarding still must: without the flowtable modules, with a
smaller MTU on the WAN side, without a route back to the flow's source (and offload follows
once there is one), and when a link goes down or a route changes under a flow.
"""

from __future__ import annotations

import ipaddress

import pytest

from kmodtest import flowtable
from kmodtest.guest import conntrack as ct
from kmodtest.guest import links, traffic, wire
from kmodtest.guest.nft import Nft
from kmodtest.guest.rulesets import router_ruleset, sample_paths

pytestmark = pytest.mark.per_nic

NBYTES = 2_000_000
FLOWTABLE_MODULES = tuple(reversed(flowtable.MODULES))  # users first, as rmmod needs them


def _loaded(host) -> list[str]:
    return [m for m in FLOWTABLE_MODULES if host.file(f"/sys/module/{m}").exists]


def test_flow_add_is_refused_without_flowtable_modules_and_forwarding_works(
    router, host, endpoints, nft
):
    modprobe = ct.read_sysctl(host, "kernel.modprobe")
    # load what the flowtable-less ruleset needs (nft_ct ...) while autoload still works
    assert nft.apply(router_ruleset(flowtable=False)).rc == 0
    host.check_output("nft flush ruleset")
    try:
        # rmmod, not modprobe -r: that would take nf_tables along, and nft with it. The reset
        # flushed the ruleset, but nf_tables frees the flowtable from a work item: retry.
        mods = " ".join(FLOWTABLE_MODULES)  # users first
        unload = host.run(
            f"for i in $(seq 30); do for m in {mods}; do "
            "[ -d /sys/module/$m ] && rmmod $m; done; "
            "[ -d /sys/module/nf_flow_table ] || break; sleep 0.2; done"
        )
        assert _loaded(host) == [], f"modules still loaded: {unload.stderr}"
        host.check_output("echo /bin/false >/proc/sys/kernel/modprobe")  # block autoload

        refused = nft.apply(router_ruleset())
        still_unloaded = _loaded(host)
        ruleset_after = nft.ruleset()

        assert nft.apply(router_ruleset(flowtable=False)).rc == 0
        before = sample_paths(nft, 4)
        result = traffic.transfer(endpoints, router.topology, "tcp", 4, "up", NBYTES)
        during = sample_paths(nft, 4) - before
    finally:
        host.run(f"echo {modprobe} >/proc/sys/kernel/modprobe")
        restored = host.run(f"modprobe -a {' '.join(FLOWTABLE_MODULES)}")
        if restored.rc != 0 or ct.read_sysctl(host, "kernel.modprobe") != modprobe:
            router.tainted = f"could not restore module autoload: {restored.stderr}"

    assert refused.rc != 0, "flow add accepted without the flowtable modules"
    # the kernel knows no flowtable type / flow_offload expression: ENOENT, on the flowtable
    assert "No such file or directory" in refused.stderr, refused.stderr
    assert "flowtable ft" in refused.stderr, refused.stderr
    assert still_unloaded == [], f"autoload was not blocked: {still_unloaded} got loaded"
    assert ruleset_after.strip() == "", "a refused batch left rules behind"
    assert result.intact, str(result)
    assert during.slowpath.bytes >= NBYTES, f"without a flowtable all must go slow: {during}"


WAN_MTU = 1280


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_smaller_wan_mtu_sends_oversize_packets_to_slow_path(router, host, endpoints, nft, family):
    assert nft.apply(router_ruleset()).rc == 0
    server = router.topology.server.address(family)
    # e1000e and e1000 reset their link on an MTU change: traffic waits for carrier
    links.change(host, f"ip link set dev wan mtu {WAN_MTU}", router.namespaces)
    try:
        with wire.oversize_meter(endpoints, "server", "eth0", WAN_MTU) as crossed_oversize:
            too_big = traffic.icmp_too_big_sent(host, family)
            refused = traffic.frag_fails(host, family)
            with traffic.open_flow(endpoints, router.topology, "tcp", family, "up", NBYTES) as t:
                t.feed()
                t.wait_received()
                entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
                result = t.close()
            too_big = traffic.icmp_too_big_sent(host, family) - too_big
            refused = traffic.frag_fails(host, family) - refused
            oversize_at_server = crossed_oversize()
        pmtu = endpoints.check_output(f"ip -n client -{family} route get {server}")
    finally:  # the client's learnt PMTU would outlive this test (the reset puts 1500 back)
        endpoints.run("ip -n client route flush cache; ip -n client -6 route flush cache")

    # the client sends 1500-byte packets (server MSS 1460); the flowtable hands every packet
    # over the 1280 egress MTU to the classic path, which refuses it and answers "too big"; the
    # client's PMTU drops, and the now-fitting packets are offloaded
    assert oversize_at_server == 0, (
        f"{oversize_at_server} packets over the {WAN_MTU}-byte WAN MTU reached the server: "
        "the fast path forwarded oversize packets instead of handing them to the classic path"
    )
    assert refused > 0 and too_big > 0, (
        f"classic path refused {refused} oversize packets, sent {too_big} ICMP too-big: "
        "the oversize packets did not take the classic path"
    )
    assert f"mtu {WAN_MTU}" in pmtu, f"client did not learn the path MTU: {pmtu}"
    assert entry.offloaded, f"{entry.raw}{ct.state_report(host)}"
    assert result.intact, str(result)


def test_masqueraded_packets_the_fast_path_refuses_still_leave_natted(router, host, endpoints, nft):
    """An offloaded, masqueraded upload whose packets the fast path hands back one by one: the
    client sends without DF over a WAN whose MTU is smaller, so every full-size packet is too
    big for the flow and takes the classic path (which fragments it), while the server's small
    ACKs stay on the fast path. Conntrack then sees the data but not the ACKs that move its
    TCP window on; it must not call the data out of window (the flowtable marks an offloaded
    TCP flow liberal for that), or the packets leave untracked: not masqueraded, with the
    client's private address, and the server never gets the upload."""
    assert nft.apply(router_ruleset(nat=True)).rc == 0
    topo = router.topology
    client_ip = topo.client.address(4)
    links.change(host, f"ip link set dev wan mtu {WAN_MTU}", router.namespaces)
    port = traffic.new_port()
    unnatted = {"from-client-address": f"ip saddr {client_ip}"}
    before = sample_paths(nft, 4)
    with (
        wire.rewrite_sent(
            endpoints, topo.client.netns, f"tcp dport {port}", "ip frag-off set 0"
        ) as no_df,
        wire.ingress_meter(endpoints, topo.server.netns, topo.server.name, unnatted) as at_server,
        traffic.open_flow(endpoints, topo, "tcp", 4, "up", NBYTES, port=port) as t,
    ):
        t.feed()
        t.wait_received()
        during = sample_paths(nft, 4) - before
        entry = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
        result = t.close()
        sent_without_df, leaked = no_df(), at_server()["from-client-address"]

    report = f"{t.flow}: {during}\n{entry.raw}"
    assert entry.offloaded, f"not offloaded, so this says nothing: {report}"
    assert sent_without_df > 0 and during.slowpath.bytes >= NBYTES // 2, (
        f"{sent_without_df} packets sent without DF; the classic path did not carry the "
        f"oversize data: {report}"
    )
    assert leaked == 0, (
        f"{leaked} packets reached the server with the client's address {client_ip}: the "
        f"classic path forwarded them untracked, without masquerade: {report}"
    )
    assert result.intact, f"{result}\n{report}"


UNROUTED_FIRST = 128 * 1024  # sent before the route back exists; the rest of NBYTES after


def test_flow_without_route_back_is_not_offloaded_until_the_route_appears(
    router, host, endpoints, nft
):
    """``flow add`` needs a route in each direction (nft_flow_route()): a UDP flow from a
    client address the router has no route back to is refused, and must still be forwarded,
    by the forward chain, without conntrack calling it [OFFLOAD]. The refusal must not stick:
    once the route back appears, the flow's next packet retries and the flow is offloaded.
    (Marking the entry offloaded before the route lookup and not clearing it on failure leaves
    a flow that says [OFFLOAD] but is in no flowtable, and is never offloaded later: ``flow
    add`` takes the flag for "already there".) IPv6: see :class:`traffic.UnroutedSource`."""
    assert nft.apply(router_ruleset()).rc == 0
    topo = router.topology
    with (
        traffic.unrouted_source(host, endpoints, topo) as src,
        traffic.open_flow(endpoints, topo, "udp", 6, "up", NBYTES, client_ip=src.address) as t,
    ):
        before = sample_paths(nft, 6)
        t.feed(UNROUTED_FIRST)
        t.wait_received()
        unrouted = sample_paths(nft, 6) - before
        refused = ct.the_entry(ct.proc_entries(host), "udp", t.flow.port)

        src.route_back()
        before = sample_paths(nft, 6)
        t.feed()
        t.wait_received()
        routed = sample_paths(nft, 6) - before
        entry = ct.the_entry(ct.proc_entries(host), "udp", t.flow.port)
        result = t.close()

    report = (
        f"{t.flow} from {src.address}\n"
        f"without a route back to {src.network}: {unrouted}\n  {refused.raw}\n"
        f"after the route back appeared: {routed}\n  {entry.raw}"
    )
    assert refused.orig.src == src.address, f"the flow did not come from {src.address}: {report}"
    # the premise: no route back, so the flowtable refused the flow and the forward chain
    # carried it (were it offloaded, the router would have a route back to the client after all)
    assert unrouted.slowpath.packets > 0 and unrouted.mostly_classic(), (
        f"without a route back, the flow's packets did not all take the forward chain: {report}"
        f"{ct.state_report(host)}"
    )
    assert not refused.offloaded, (
        f"conntrack says [OFFLOAD] for a flow the flowtable refused (the router has no route "
        f"back to {src.address}; the flag was set and not cleared when the route lookup "
        f"failed): {report}{ct.state_report(host)}"
    )
    assert entry.offloaded, (
        f"not offloaded once the route back appeared: the refusal stuck to the flow: "
        f"{report}{ct.state_report(host)}"
    )
    assert routed.mostly_offloaded(NBYTES - UNROUTED_FIRST), (
        f"once the route back appeared, the classic path carried too much: {report}"
    )
    assert result.intact, f"{result}\n{report}"


def _path_switch(router, host, nft: Nft, switch: str, eager: bool) -> None:
    """Offload a flow to the backup path's service address, run ``switch`` (guest shell) mid
    flow, and check the rest of the payload follows the new route, offloaded again.

    ``eager``: the switch itself tears the flow down (a device going down); otherwise the
    flowtable notices on the next packet, when its cached route fails the dst check.
    """
    with traffic.backup_path(host, router.topology) as p:
        ports = ("lan", "wan", p.router_dev)
        applied = nft.apply(router_ruleset(devices=ports))
        assert applied.rc == 0, applied.stderr
        with traffic.open_flow(
            host, router.topology, "tcp", 4, "up", NBYTES, server_ip=p.service_ip
        ) as t:
            t.feed(NBYTES // 2)
            t.wait_received()
            first = ct.the_entry(ct.proc_entries(host), "tcp", t.flow.port)
            backup_tx = traffic.link_stats(host, p.router_dev).tx_bytes
            links.change(host, switch, router.topology.namespaces)
            torn_down = None
            if eager:
                torn_down = ct.wait_entry(
                    host, "tcp", t.flow.port, ct.in_classic_path, what="teardown"
                )
            before = sample_paths(nft, 4, ports)
            t.feed()
            t.wait_received()
            again = ct.wait_entry(host, "tcp", t.flow.port, ct.in_flowtable, what="new offload")
            during = sample_paths(nft, 4, ports) - before
            backup_tx = traffic.link_stats(host, p.router_dev).tx_bytes - backup_tx
            result = t.close()

    assert first.offloaded, first.raw
    if torn_down is not None:
        assert torn_down.state == "ESTABLISHED", torn_down.raw
    # the first packets on the new route took the classic path (that is where the new flow
    # was added), the rest was offloaded again
    assert during.slowpath.packets > 0, f"nothing took the classic path: {during}"
    assert during.mostly_offloaded(NBYTES // 2), str(during)
    assert backup_tx >= NBYTES // 2, f"only {backup_tx} B left via the backup link"
    assert again is not None and again.offloaded
    assert result.intact, str(result)


def test_link_down_tears_flow_down_and_traffic_follows_backup_route(router, host, nft):
    # both ends of the WAN "cable": routes over it vanish, the metric-20 ones take over
    switch = "ip link set wan down; ip -n server link set eth0 down"
    _path_switch(router, host, nft, switch, eager=True)


def test_route_change_tears_flow_down_and_traffic_follows_new_route(router, host, nft):
    p = traffic.BackupPath()
    client_net = ipaddress.ip_interface(router.topology.client.ipv4).network
    _path_switch(
        router, host, nft,
        f"ip route replace {p.service_ip}/32 via {p.server_ip} dev {p.router_dev} metric 10; "
        f"ip -n server route add {client_net} via {p.router_ip} dev {p.server_dev}",
        eager=False,
    )  # fmt: skip
