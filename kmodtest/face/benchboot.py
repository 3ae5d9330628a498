"""``kmodtest bench-boot``: boot to first command, cold and restored, next to virtme-ng's.

Each round runs, one after another on the same kernel image: a cold boot of the case (no saved
state), a restore of its saved state, and ``vng --run <kernel> --disable-kvm --force-9p --cpus
N -- true`` (virtme-ng, the tool kernel developers use; as many emulated CPUs as ours).
Alternating them round by round (A B C A B C ...) spreads the machine's load over all three,
and with several cells every round runs each cell in turn; the table gives medians and the
ratios to virtme-ng's. Ours is timed from QEMU's start to the
agent's first answer; virtme-ng's is the whole command (it runs ``true`` and powers off),
measured the way a user waits for it.

virtme-ng is given the cell's kernel package as a host that installed it has it
(``boot/vmlinuz-<release>`` beside ``lib/modules/<release>``, see ``prepare/kernelpackage``):
the same kernel file as the image's, with the modules it needs to mount its 9p root (Debian
builds 9p and 9pnet_virtio as modules). Given the image's kernel file alone, vng finds no modules,
boots without an initramfs, and the kernel panics at mounting root: vng exits with 255. Its
guest init also needs the host's ``systemd-udevd`` (the ``udev`` package): it runs it to name
the virtio-serial ports that carry the command's output and exit code; without it the command
runs, but vng exits with 255 all the same.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kmodtest import processes
from kmodtest.arches import host_arch
from kmodtest.errors import KmodtestError
from kmodtest.face.options import Settings
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.images import Images
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.lifecycle.snapshots import Snapshots
from kmodtest.prepare.cells import Cell, DebianSource
from kmodtest.prepare.images import Image, ImageBuilder
from kmodtest.prepare.kernelpackage import get_kernel_package
from kmodtest.prepare.overlay import kernel_packages
from kmodtest.progress import Progress
from kmodtest.run.accel import choose_accel
from kmodtest.run.emulator import choose_qemu

# read in logs and pipes too, where rich would assume 80 columns and wrap every cell
console = Console() if Console().is_terminal else Console(width=200)
VNG_TIMEOUT = 300.0
VNG_ARGS = ("--run",)
VNG_OPTIONS = ("--disable-kvm", "--force-9p")


def vng_options(cell: Cell) -> tuple[str, ...]:
    """vng gets as many emulated CPUs as the cell's VMs (its default is one per host core):
    like for like."""
    return (*VNG_OPTIONS, "--cpus", str(cell.smp))


# where virtme-ng's guest init looks for udevd on the host's root (see the docstring)
UDEVD = (Path("/lib/systemd/systemd-udevd"), Path("/usr/lib/systemd/systemd-udevd"))


FIGURES = ("cold", "cold ready", "restored", "restored ready", "vng")


def find_vng() -> str | None:
    """virtme-ng's ``vng``: next to this Python first (a venv), then on PATH."""
    local = Path(sys.executable).parent / "vng"
    return str(local) if local.exists() else shutil.which("vng")


def vng_kernel(cell: Cell, image: Image, builder: ImageBuilder) -> Path:
    """The image's kernel inside its installed package tree (modules beside it), for vng.

    Raises VngFailed, saying why, for a cell vng cannot be given the same kernel on."""
    if not isinstance(cell.spec.source, DebianSource):
        raise VngFailed("compared on Debian cells only (it needs the kernel's package)")
    if cell.arch != host_arch():
        raise VngFailed(f"compared on the host's arch only, not {cell.arch.name}")
    if not any(path.exists() for path in UDEVD):
        raise VngFailed(
            f"its guest init needs the host's systemd-udevd ({UDEVD[0]}) to find the ports "
            "that carry the command's exit code, or vng exits with 255; fix: install udev"
        )
    try:
        kernel = get_kernel_package(builder.cache, kernel_packages(cell, image), builder.progress)
    except KmodtestError as exc:
        raise VngFailed(f"no kernel package tree: {exc}") from exc
    if kernel.read_bytes() != image.kernel.read_bytes():
        raise VngFailed(f"{kernel} is not the image's kernel file {image.kernel}")
    return kernel


def _vng_seconds(vng: str, kernel: Path, options: tuple[str, ...], log: Path) -> float:
    # vng runs its siblings (virtme-run) through the shell: its directory goes first on PATH
    env = {**os.environ, "PATH": f"{Path(vng).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    with open(log, "ab") as out:
        proc = processes.spawn(
            [vng, *VNG_ARGS, str(kernel), *options, "--", "true"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            proc.wait(VNG_TIMEOUT)
        finally:
            processes.terminate(proc)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        said = log.read_text(errors="replace").strip()[-300:] or "nothing"
        raise VngFailed(f"vng exited with {proc.returncode}; it said: {said}")
    return seconds


class VngFailed(Exception):
    """virtme-ng could not run here; our own figures are still printed."""


def _ours(pool: RouterPool, case: VmCase) -> tuple[float, float]:
    """(launch to first command, launch to ready for a test) of one fresh VM of ``case``."""
    pool.stop_current()
    start = time.perf_counter()
    router = pool.acquire(case)
    ready = time.perf_counter() - start
    pool.end_test(case)
    pool.stop_current()
    return router.boot_seconds, ready


@dataclass
class _CellBench:
    """One cell's figures: its case, two pools (cold and restored) and virtme-ng, if it can
    be compared there."""

    cell: Cell
    case: VmCase
    image: Image
    accel: str
    cold: RouterPool
    warm: RouterPool
    vng: str | None
    kernel: Path | None = None
    vng_failed: str = ""
    times: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in FIGURES})

    @classmethod
    def open(
        cls, args: argparse.Namespace, cell: Cell, builder: ImageBuilder, logs: Path
    ) -> _CellBench:
        settings = Settings.from_args(args)
        choose_qemu([cell.arch], settings.qemu, builder.cache, Progress())
        accel = choose_accel(cell.arch, settings.accel).accel
        image = builder.get(cell)
        wanted = args.nic.split(",") if args.nic else cell.spec.nics
        case = VmCase(cell, next(n for n in cell.spec.nics if n in wanted))
        logs = logs / cell.id
        cold = RouterPool(Images(builder), logs / "cold", accel=accel)
        warm = RouterPool(Images(builder), logs / "restored", accel=accel,
                          snapshots=Snapshots(builder.cache))  # fmt: skip
        bench = cls(cell, case, image, accel, cold, warm, find_vng())
        if bench.vng is not None:
            try:
                bench.kernel = vng_kernel(cell, image, builder)
            except VngFailed as exc:
                bench.vng_failed = str(exc)
        return bench

    def prepare(self) -> None:
        """Make sure the saved state exists before the first timed round."""
        _ours(self.warm, self.case)

    def round(self, logs: Path) -> None:
        for name, pool in (("cold", self.cold), ("restored", self.warm)):
            first, ready = _ours(pool, self.case)
            self.times[name].append(first)
            self.times[f"{name} ready"].append(ready)
        if self.vng is not None and self.kernel is not None and not self.vng_failed:
            try:
                log = logs / f"vng-{self.cell.id}.log"
                seconds = _vng_seconds(self.vng, self.kernel, vng_options(self.cell), log)
                self.times["vng"].append(seconds)
            except VngFailed as exc:
                self.vng_failed = str(exc)

    def close(self) -> None:
        self.cold.close()
        self.warm.close()

    def rows(self, table: Table, rounds: int) -> None:
        times = self.times
        if self.vng_failed:  # no ratios against a partial set of runs
            times["vng"].clear()
        cell = self.cell

        def median(name: str) -> float:
            return statistics.median(times[name])

        def row(figure: str, name: str, target: str = "") -> None:
            ratio = f"{median(name) / median('vng'):.2f}x" if times["vng"] else ""
            rounds = " ".join(f"{t:.2f}" for t in times[name])
            table.add_row(cell.id, figure, f"{median(name):.2f} s", rounds, ratio, target)

        table.add_row(
            cell.id,
            f"case {self.case.name}, kernel {self.image.kernel_version}, {self.accel}, "
            f"machine {cell.machine}, cpu {cell.cpu}, smp {cell.smp}"
            + (f", append {cell.spec.append}" if cell.spec.append else ""),
            f"{rounds} rounds", "", "", "",
        )  # fmt: skip
        row("cold boot to first command", "cold", "<= 1.0x")
        row("cold boot to ready for a test (network set up)", "cold ready")
        row("restore to first command", "restored", "<= 1 s, <= 0.3x")
        row("restore to ready for a test (clock set)", "restored ready")
        if self.vng_failed:
            table.add_row(cell.id, "virtme-ng", "failed", "", "", self.vng_failed)
        elif times["vng"]:
            row(f"virtme-ng: vng --run KERNEL {' '.join(vng_options(cell))} -- true", "vng")
        else:
            table.add_row(cell.id, "virtme-ng", "not installed", "", "",
                          "pip install virtme-ng (into this venv) for the comparison")  # fmt: skip


def run_bench_boot(args: argparse.Namespace, cells: list[Cell], builder: ImageBuilder) -> int:
    """Round by round, every cell in turn (A B A B ...), so that the machine's load falls
    on all of them alike: the way to compare machine variants of one kernel (cells of a
    ``--kernels-dir`` that differ in ``machine``, ``cpu``, ``smp`` or ``append``)."""
    table = Table("cell", "figure", "median", "each round", "vs virtme-ng", "target")
    with tempfile.TemporaryDirectory(prefix="kmodtest-bench-boot-") as tmp, ExitStack() as stack:
        benches = []
        for cell in cells:
            bench = _CellBench.open(args, cell, builder, Path(tmp))
            stack.callback(bench.close)
            bench.prepare()
            benches.append(bench)
        for _ in range(args.rounds):
            for bench in benches:
                bench.round(Path(tmp))
        for bench in benches:
            bench.rows(table, args.rounds)
    console.print(table)
    return 0
