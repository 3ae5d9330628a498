"""The labs of one run (or one xdist worker): a strategy per VM case, at most one running.

Tests are grouped by case (pytest orders session-scoped parameters that way, and the xdist
scheduler sends a case to one worker), so a worker boots each case once; running one lab at a
time keeps a 2-core machine from thrashing. What a stopped lab's console said after its last
test, and what is found when the run ends, is kept in :attr:`RouterPool.problems` for the
caller to report: no console byte goes unread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.guest.boot import BOOT_TIMEOUT
from kmodtest.guest.health import HealthProblem
from kmodtest.guest.router import Router
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.images import Images
from kmodtest.lifecycle.snapshots import Snapshots
from kmodtest.lifecycle.strategy import CaseStrategy
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import ImageBuilder
from kmodtest.run.accel import AccelChoice, choose_accel
from kmodtest.run.launcher import Launcher, RunningMachine, make_launcher


@dataclass
class RouterPool:
    images: Images
    log_root: Path
    accel: str = "auto"  # what the user asked for; per arch it becomes kvm or tcg
    icount: bool = False
    boot_timeout: float = BOOT_TIMEOUT  # --boot-timeout
    backend: str | None = None  # --backend; None: the cell's backend:, else qemu
    libvirt_uri: str | None = None
    snapshots: Snapshots | None = None  # saved lab states; None: every VM boots cold
    detachable: bool = False  # its VMs may be kept running after the run (QEMU only)
    configure_network: bool = True  # False: guests only, no test network (kmodtest run)
    launchers: dict[str, Launcher] = field(default_factory=dict)  # backend name -> launcher
    strategies: dict[tuple[str, str], CaseStrategy] = field(default_factory=dict)
    current: CaseStrategy | None = None
    boots: int = 0
    booted: list[str] = field(default_factory=list)  # one line per boot, for the summary
    problems: list[str] = field(default_factory=list)  # kernel problems found outside a test
    accels: dict[str, AccelChoice] = field(default_factory=dict)

    @property
    def builder(self) -> ImageBuilder:
        return self.images.builder

    def backend_for(self, cell: Cell) -> str:
        return self.backend or cell.spec.backend or "qemu"

    def launcher_for(self, cell: Cell) -> Launcher:
        backend = self.backend_for(cell)
        if backend not in self.launchers:
            self.launchers[backend] = make_launcher(backend, self.libvirt_uri, self.detachable)
        return self.launchers[backend]

    def accel_for(self, cell: Cell) -> AccelChoice:
        if cell.arch.name not in self.accels:
            self.accels[cell.arch.name] = choose_accel(cell.arch, self.accel)
        return self.accels[cell.arch.name]

    def strategy(self, case: VmCase) -> CaseStrategy:
        if case.key not in self.strategies:
            self.strategies[case.key] = CaseStrategy(
                case, self.images, self.launcher_for(case.cell), self.accel_for(case.cell).accel,
                log_dir=lambda: self._next_log_dir(case), icount=self.icount,
                boot_timeout=self.boot_timeout, snapshots=self.snapshots,
                configure_network=self.configure_network,
            )  # fmt: skip
        return self.strategies[case.key]

    def _next_log_dir(self, case: VmCase) -> Path:
        self.boots += 1
        return self.log_root / f"{case.name}-boot{self.boots}"

    def acquire(self, case: VmCase) -> Router:
        """A router of ``case`` ready for a test; another case's running lab is stopped first.

        A case whose boot failed raises its first failure again at once."""
        strategy = self.strategy(case)
        if self.current is not None and self.current is not strategy:
            self.stop_current()
        self.current = strategy
        boots = self.boots
        router = strategy.ready()
        self._collect(strategy)
        if self.boots != boots:
            how = "restored from its saved state" if strategy.restored else "up"
            unsaved = f" (its state was not saved: {strategy.unsaved})" if strategy.unsaved else ""
            self.booted.append(
                f"{router.name}: kernel {router.image.kernel_version}, "
                f"{strategy.launcher.name}, {router.spec.accel}, "
                f"{how} in {router.boot_seconds:.1f} s{unsaved}"
                + "".join(f"; {g.name}" for g in router.guests.values() if g is not router.vm)
            )
        return router

    def keep(self, case: VmCase) -> tuple[Router, list[RunningMachine], Path] | None:
        """The case's running lab, handed over as the test left it (see
        :meth:`CaseStrategy.detach`); the case's next test boots a new one."""
        return self.strategy(case).detach()

    def end_test(self, case: VmCase) -> HealthProblem | None:
        """Reset after a test and scan its console window (see :meth:`CaseStrategy.end_test`)."""
        return self.strategy(case).end_test()

    def release(self, case: VmCase) -> HealthProblem | None:
        """After a test: replace a tainted router; the problem its last window shows, if any."""
        return self.strategy(case).release()

    def finish_case(self, case: VmCase) -> HealthProblem | None:
        """The case's last test (of this run or worker) is over: stop its lab now, so what its
        console said last is still that test's."""
        if self.current is None or self.current.case.key != case.key:
            return None
        strategy, self.current = self.current, None
        return strategy.stop()

    def stop_current(self) -> None:
        if self.current is not None:
            if problem := self.current.stop():
                self.problems.append(f"{self.current.case.name}, after its last test: {problem}")
            self._collect(self.current)
            self.current = None

    def close(self) -> list[str]:
        """Stop everything; every kernel problem found outside a test, one text each."""
        self.stop_current()
        return self.problems

    def _collect(self, strategy: CaseStrategy) -> None:
        for problem in strategy.unattributed:
            self.problems.append(f"{strategy.case.name}, between tests: {problem}")
        strategy.unattributed.clear()
