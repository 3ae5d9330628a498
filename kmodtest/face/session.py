"""Per-run state shared by the plugin and the fixtures: selected cells, images, running VMs."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.errors import KmodtestError
from kmodtest.guest.router import RouterVM
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import PASSTHROUGH_NIC, Cell, Matrix
from kmodtest.prepare.images import Image, ImageBuilder
from kmodtest.run.accel import AccelChoice, choose_accel
from kmodtest.run.launcher import Launcher, make_launcher
from kmodtest.run.passthrough import missing_guest_driver

log = logging.getLogger(__name__)


class PassthroughUnavailable(KmodtestError):
    """A passthrough case cannot run here; the router fixture turns this into a skip."""


def wanted_nics(option: str | None) -> list[str] | None:
    """The ``--nic`` option as a list; None when absent (every model a cell lists)."""
    return [n.strip() for n in option.split(",")] if option else None


def case_nics(cell: Cell, wanted: Sequence[str] | None) -> list[str]:
    """The NIC models a cell's per-NIC tests run on; its per-kernel tests use the first.

    One rule for parametrization and for the xdist scheduler, which must agree on it.
    """
    return [n for n in cell.nic_cases if wanted is None or n in wanted]


@dataclass(frozen=True)
class VmCase:
    """What a VM test runs on: a cell and the NIC model its router uses."""

    cell: Cell
    nic: str
    # only the test id depends on it: equal cases share one VM, and pytest (which groups
    # session-scoped parameters by equality) runs per-kernel tests next to the per-NIC tests
    # of the same cell and NIC, so that VM boots once
    per_nic: bool = field(default=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.cell.id}-{self.nic}" if self.per_nic else self.cell.id

    @property
    def key(self) -> tuple[str, str]:
        return (self.cell.id, self.nic)


@dataclass
class RouterPool:
    """Boots a router per (cell, NIC) once and reuses it; holds at most one VM at a time.

    Tests are grouped by case (pytest orders session-scoped parameters that way), so a worker
    boots each kernel once; holding one VM keeps a 2-core machine from thrashing.
    """

    builder: ImageBuilder
    log_root: Path
    accel: str = "auto"
    icount: bool = False
    backend: str | None = None  # --backend; None: the cell's backend:, else qemu
    libvirt_uri: str | None = None
    refresh_images: bool = False
    # a layer over each base image (--module-patch): (cell, base image) -> layered image
    overlay: Callable[[Cell, Image], Image] | None = None
    current: RouterVM | None = None
    boots: int = 0
    booted: list[str] = field(default_factory=list)  # one line per boot, for the summary
    images: dict[str, Image] = field(default_factory=dict)
    accels: dict[str, AccelChoice] = field(default_factory=dict)
    launchers: dict[str, Launcher] = field(default_factory=dict)

    def backend_for(self, cell: Cell) -> str:
        return self.backend or cell.spec.backend or "qemu"

    def launcher_for(self, cell: Cell) -> Launcher:
        backend = self.backend_for(cell)
        if backend not in self.launchers:
            self.launchers[backend] = make_launcher(backend, self.libvirt_uri)
        return self.launchers[backend]

    def image(self, cell: Cell) -> Image:
        if cell.id not in self.images:
            image = self.builder.get(cell, refresh=self.refresh_images)
            self.images[cell.id] = self.overlay(cell, image) if self.overlay else image
        return self.images[cell.id]

    def accel_for(self, cell: Cell) -> AccelChoice:
        if cell.arch.name not in self.accels:
            self.accels[cell.arch.name] = choose_accel(cell.arch, self.accel)
        return self.accels[cell.arch.name]

    def acquire(self, case: VmCase) -> RouterVM:
        vm = self.current
        if vm is not None and (vm.cell.id, vm.topology.nic_model) == case.key and not vm.tainted:
            try:
                vm.reset()
                return vm
            except Exception as exc:  # a broken reset means a broken VM: boot a new one
                log.warning("reset of %s failed, rebooting: %s", vm.spec.name, exc)
                vm.tainted = f"reset failed: {exc}"
        self.stop_current()
        image = self.image(case.cell)
        if case.nic == PASSTHROUGH_NIC and case.cell.spec.passthrough:
            modules = image.manifest["modules"] + image.manifest.get("modules_builtin", [])
            ports = case.cell.spec.passthrough.by_port()
            if why := missing_guest_driver(ports, modules):
                raise PassthroughUnavailable(why)
        self.boots += 1
        log_dir = self.log_root / f"{case.cell.id}-{case.nic}-boot{self.boots}"
        vm = RouterVM.create(
            case.cell, image, case.nic, log_dir, self.accel_for(case.cell).accel, self.icount,
            self.launcher_for(case.cell),
        )  # fmt: skip
        self.current = vm.start()
        self.booted.append(
            f"{vm.spec.name}: kernel {image.kernel_version}, {vm.launcher.name}, {vm.spec.accel}, "
            f"up in {vm.boot_seconds:.1f} s"
        )
        return vm

    def release(self, vm: RouterVM) -> None:
        if vm.tainted or not vm.alive:
            log.info("replacing %s: %s", vm.spec.name, vm.tainted or "QEMU exited")
            if vm is self.current:
                self.stop_current()
            else:
                vm.stop()

    def stop_current(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@dataclass
class KmodtestSession:
    matrix: Matrix
    cells: list[Cell]
    explicit: bool  # the user named cells with --kernel (missing QEMU is then an error)
    cache: Cache
    pool: RouterPool
    log_root: Path
    keep_logs: bool
    skips: dict[str, str] = field(default_factory=dict)  # cell id -> why it cannot run here
    # (cell id, NIC model) -> why that NIC cannot run here (e.g. igb before QEMU 8.0)
    nic_skips: dict[tuple[str, str], str] = field(default_factory=dict)

    def finish(self, failed: bool) -> None:
        self.pool.stop_current()
        if not failed and not self.keep_logs:
            shutil.rmtree(self.log_root, ignore_errors=True)
