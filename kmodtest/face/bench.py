"""``kmodtest bench``: the figures behind the speed targets, printed, never asserted.

Targets (TCG, this 2-core machine): boot-to-first-command <= 2.5 s, command round trip
<= 5 ms median, reset <= 0.3 s. Absolute times are noisy here; compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kmodtest.face.options import Settings
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.images import Images
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import ImageBuilder
from kmodtest.progress import Progress
from kmodtest.run.accel import choose_accel
from kmodtest.run.emulator import choose_qemu, describe

console = Console()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_cell(args: argparse.Namespace, cell: Cell, builder: ImageBuilder, table: Table) -> None:
    def row(figure: str, value: str, target: str = "") -> None:
        table.add_row(cell.id, figure, value, target)

    if not args.no_cold:
        with tempfile.TemporaryDirectory(prefix="kmodtest-bench-") as tmp:
            cold = ImageBuilder(Cache(Path(tmp)), builder.images_dir, Progress())
            row("image build, cold (fetch + assemble)", f"{_timed(lambda: cold.get(cell)):.1f} s")
    builder.get(cell)  # make sure the shared cache has it
    cached = statistics.median(_timed(lambda: builder.get(cell)) for _ in range(5))
    row("image build, cached", f"{cached * 1000:.1f} ms")

    settings = Settings.from_args(args)
    (qemu,) = choose_qemu([cell.arch], settings.qemu, builder.cache, Progress())
    row("QEMU", describe(qemu))
    accel = choose_accel(cell.arch, settings.accel)
    row("accelerator", f"{accel.accel} ({accel.reason})")
    with tempfile.TemporaryDirectory(prefix="kmodtest-bench-logs-") as logs:
        pool = RouterPool(Images(builder), Path(logs), accel=accel.accel,
                          backend=settings.backend, libvirt_uri=settings.libvirt_uri)  # fmt: skip
        row("backend", pool.backend_for(cell))
        case = VmCase(cell, cell.spec.nics[0])
        try:
            boots, setups = [], []
            for _ in range(args.boots):
                pool.stop_current()
                start = time.perf_counter()
                router = pool.acquire(case)
                setups.append(time.perf_counter() - start)
                boots.append(router.boot_seconds)
                pool.end_test(case)
            vm = pool.acquire(case)
            row(f"boot to first command (median of {len(boots)})",
                f"{statistics.median(boots):.2f} s", "<= 2.5 s")  # fmt: skip
            row("boot + network setup (median)", f"{statistics.median(setups):.2f} s")
            rtts = [_timed(lambda: vm.run("true")) for _ in range(args.commands)]
            row(f"round trip `true`, median of {len(rtts)}",
                f"{statistics.median(rtts) * 1000:.1f} ms", "<= 5 ms")  # fmt: skip
            row("round trip `true`, p95", f"{_pct(rtts, 0.95) * 1000:.1f} ms")
            nft = [_timed(lambda: vm.run("nft list ruleset")) for _ in range(20)]
            row("round trip `nft list ruleset`, median", f"{statistics.median(nft) * 1000:.1f} ms")
            resets = [_timed(vm.reset) for _ in range(args.resets)]
            row(f"reset, median of {len(resets)}", f"{statistics.median(resets):.3f} s", "<= 0.3 s")

            pool.end_test(case)

            def reuse() -> None:  # what the fixtures do around each test: reset, health window
                pool.acquire(case)
                pool.end_test(case)
                pool.release(case)

            overhead = [_timed(reuse) for _ in range(args.resets)]
            row("per-test overhead with VM reuse (median)", f"{statistics.median(overhead):.3f} s")
        finally:
            pool.stop_current()


def run_bench(args: argparse.Namespace, cells: list[Cell], builder: ImageBuilder) -> int:
    table = Table("cell", "figure", "value", "target")
    for cell in cells:
        _bench_cell(args, cell, builder, table)
    console.print(table)
    return 0
