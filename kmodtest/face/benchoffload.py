"""``kmodtest bench-offload``: what the flowtable buys, per kernel, as ratios from one run.

For each selected cell it boots the router once and measures, with and without offload:

- TCP throughput client -> router -> server (a sha256-checked socat transfer);
- ping RTT client -> server while a bulk TCP transfer runs (the bufferbloat claim: a flow on
  the fast path leaves the CPU, and so the queues, to everything else), and idle.

"Without offload" is the same ruleset minus the ``flow add`` rule, so both runs pay for
conntrack and the forward-chain counter alike. Client, router and server share the guest's
one emulated CPU: the ratios show what forwarding costs on it, not line rate. Figures are
printed, never asserted; absolute values are noisy here, compare within one run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kmodtest.face.options import Settings
from kmodtest.guest import traffic
from kmodtest.guest.nft import Nft
from kmodtest.guest.router import Router
from kmodtest.guest.rulesets import router_ruleset, sample_paths
from kmodtest.lifecycle.case import VmCase, case_nics, wanted_nics
from kmodtest.lifecycle.images import Images
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import ImageBuilder
from kmodtest.progress import Progress
from kmodtest.run.accel import choose_accel
from kmodtest.run.emulator import choose_qemu

console = Console(width=max(Console().width, 110))
RTT = re.compile(r"time=([0-9.]+) ?ms")
PING_INTERVAL = 0.2
BULK_PORT = 5999


@contextmanager
def bulk(vm: Router, seconds: float) -> Iterator[None]:
    """A TCP stream from /dev/zero, client -> server, for at most ``seconds`` (no files)."""
    server = vm.topology.server.address(4)
    cli, srv = vm.topology.client.netns, vm.topology.server.netns
    vm.host.check_output(
        f"ip netns exec {srv} timeout {seconds + 5} socat -u "
        f"TCP-LISTEN:{BULK_PORT},reuseaddr OPEN:/dev/null </dev/null >/dev/null 2>&1 &\n"
        "sleep 0.5\n"
        f"ip netns exec {cli} timeout {seconds} socat -u /dev/zero "
        f"TCP:{server}:{BULK_PORT} </dev/null >/dev/null 2>&1 &\n"
        "sleep 1"
    )
    try:
        yield
    finally:
        vm.host.run("pkill -f 'socat -u' ; sleep 0.2")


@dataclass(frozen=True)
class PathFigures:
    """One mode's measurements (offload or classic)."""

    mbytes_per_s: float
    slowpath_packets: int  # forward-chain packets during the throughput transfer
    rtt_loaded_ms: float  # median while a bulk transfer runs
    rtt_loaded_p90_ms: float
    rtt_idle_ms: float


def ping_rtts(vm: Router, count: int, interval: float) -> list[float]:
    """RTTs (ms) of ``count`` pings client -> server, one every ``interval`` s."""
    server = vm.topology.server.address(4)
    ns = vm.topology.client.netns
    out = vm.host.run(
        f"ip netns exec {ns} ping -c {count} -i {interval} -W 5 {server}",
        timeout=count * interval + 30,
    )
    rtts = [float(m) for m in RTT.findall(out.stdout)]
    if not rtts:
        raise RuntimeError(f"ping gave no RTT (exit {out.rc}): {out.stdout}{out.stderr}")
    return rtts


def measure(vm: Router, offload: bool, nbytes: int, pings: int) -> PathFigures:
    vm.reset()
    applied = Nft(vm.host).apply(router_ruleset(flow_add=offload))
    if applied.rc != 0:
        raise RuntimeError(f"ruleset refused: {applied.stderr}")
    idle = statistics.median(ping_rtts(vm, max(5, pings // 4), PING_INTERVAL))

    nft = Nft(vm.host)
    with traffic.open_flow(vm.host, vm.topology, "tcp", 4, "up", nbytes) as t:
        before = sample_paths(nft, 4)
        start = time.monotonic()
        t.feed(background=True)
        t.wait_received(timeout=600)
        seconds = time.monotonic() - start
        crossed = sample_paths(nft, 4) - before
        result = t.close()
    if not result.intact:
        raise RuntimeError(f"throughput transfer corrupted: {result}")

    with bulk(vm, seconds=pings * PING_INTERVAL + 10):
        loaded = ping_rtts(vm, pings, PING_INTERVAL)
    ordered = sorted(loaded)
    return PathFigures(
        mbytes_per_s=nbytes / seconds / 1e6,
        slowpath_packets=crossed.slowpath.packets,
        rtt_loaded_ms=statistics.median(loaded),
        rtt_loaded_p90_ms=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        rtt_idle_ms=idle,
    )


def run_bench_offload(args: argparse.Namespace, cells: list[Cell], builder: ImageBuilder) -> int:
    table = Table("cell", "figure", "offload", "classic", "offload / classic",
                  title="flowtable offload vs classic forwarding (TCP/IPv4, one run)")  # fmt: skip
    nbytes = args.megabytes * 1_000_000
    with tempfile.TemporaryDirectory(prefix="kmodtest-bench-offload-") as logs:
        for cell in cells:
            settings = Settings.from_args(args)
            choose_qemu([cell.arch], settings.qemu, builder.cache, Progress())
            accel = choose_accel(cell.arch, settings.accel)
            pool = RouterPool(Images(builder), Path(logs), accel=accel.accel)
            try:
                vm = pool.acquire(VmCase(cell, case_nics(cell, wanted_nics(args.nic))[0]))
                console.print(f"{cell.id}: kernel {vm.image.kernel_version}, {accel.accel}")
                on = measure(vm, True, nbytes, args.pings)
                off = measure(vm, False, nbytes, args.pings)
            finally:
                pool.stop_current()
            rows = [
                ("TCP throughput (MB/s)", on.mbytes_per_s, off.mbytes_per_s),
                ("ping RTT under bulk, median (ms)", on.rtt_loaded_ms, off.rtt_loaded_ms),
                ("ping RTT under bulk, p90 (ms)", on.rtt_loaded_p90_ms, off.rtt_loaded_p90_ms),
                ("ping RTT idle, median (ms)", on.rtt_idle_ms, off.rtt_idle_ms),
            ]
            for figure, a, b in rows:
                ratio = f"{a / b:.2f}x" if b else "-"
                table.add_row(cell.id, figure, f"{a:.2f}", f"{b:.2f}", ratio)
            # the proof that the two modes took different paths
            table.add_row(cell.id, "forward-chain packets in the transfer",
                          str(on.slowpath_packets), str(off.slowpath_packets), "")  # fmt: skip
    console.print(table)
    return 0
