"""A VM case's lab, walked through its states (labgrid's strategy, for our labs).

    off -> image ready -> launched -> channel up -> network configured -> ready for a test
        -> in a test -> (reset) ready for a test -> ... -> off (stopped) | broken

:class:`CaseStrategy` is the one place that knows about booting, reuse between tests, health
windows and teardown; its dependencies are declared fields (the images, the launcher, the
accelerator, the saved states), so a libvirt launcher or a snapshot-restoring one plugs in,
and a plan with two guests (router + endpoints VM) walks the same states. A boot that fails
leaves the case *broken*: every later request fails at once with the first failure, instead of
booting again for each test. Nothing here knows pytest: the CLI drives it the same way.

Kernel health, every console byte exactly once: the boot's own window is scanned when the lab
becomes ready (a problem there is a boot failure); a test's window runs from the end of the
previous one through the reset after the test and a console sync line, so what the reset's
``nft flush ruleset`` (the flowtable teardown) makes the kernel say is that test's; and the
last window is scanned when the guests stop.
"""

from __future__ import annotations

import enum
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.errors import ChannelError, CommandTimeout, KmodtestError, MachineError
from kmodtest.guest.boot import BOOT_TIMEOUT, connect_restored
from kmodtest.guest.health import HealthProblem
from kmodtest.guest.router import Router
from kmodtest.guest.vm import GuestVM, death_note
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.images import Images, failed_before
from kmodtest.lifecycle.plans import LabPlan, NodePlan, plan_for
from kmodtest.lifecycle.snapshots import FINGERPRINT, Snapshots
from kmodtest.lifecycle.snapshots import KIND as SNAPSHOT_KIND
from kmodtest.run.launcher import Launcher, RunningMachine, SavableMachine, SnapshotLauncher
from kmodtest.run.machine import HostPciLink, MachineSpec
from kmodtest.run.rundirs import new_lab_dir

log = logging.getLogger(__name__)


class State(enum.Enum):
    OFF = "off"
    IMAGE_READY = "image ready"
    LAUNCHED = "launched"
    CHANNEL_UP = "channel up"
    NETWORK_CONFIGURED = "network configured"
    READY = "ready for a test"
    IN_TEST = "in a test"
    BROKEN = "broken"


@dataclass
class _Launched:
    node: NodePlan
    spec: MachineSpec
    machine: RunningMachine
    at: float  # time.monotonic() of the launch


@dataclass
class CaseStrategy:
    case: VmCase
    images: Images
    launcher: Launcher
    accel: str
    log_dir: Callable[[], Path]  # a fresh directory for each boot's logs
    icount: bool = False
    boot_timeout: float = BOOT_TIMEOUT
    snapshots: Snapshots | None = None  # None: every VM boots cold
    configure_network: bool = True  # False: guests up, test network not set (kmodtest run)
    state: State = State.OFF
    restored: bool = False  # the running lab came from a saved state, not a boot
    unsaved: str | None = None  # why the last cold boot's state could not be saved
    router: Router | None = None
    broken: KmodtestError | None = None  # the first boot failure, repeated to later requests
    unattributed: list[HealthProblem] = field(default_factory=list)  # found outside any test
    _plan: LabPlan | None = None
    _launched: list[_Launched] = field(default_factory=list)
    _lab_dir: Path | None = None
    _snapshot_key: str | None = None  # the running lab's saved-state key, if it can have one

    # -- what callers ask for ---------------------------------------------------------------

    def ready(self) -> Router:
        """A router ready for a test, booting the lab if needed; the caller then holds it."""
        if self.state is State.BROKEN:
            assert self.broken is not None
            raise failed_before(self.broken, f"boot of {self.case.name}")
        if self.state is State.IN_TEST:  # the previous holder never ended its test
            if problem := self.end_test():
                self.unattributed.append(problem)
            if self.router is not None and self.router.tainted:
                self.stop()
        if self.state is State.OFF:
            self._boot()
        assert self.state is State.READY and self.router is not None
        self.state = State.IN_TEST
        return self.router

    def end_test(self) -> HealthProblem | None:
        """In a test -> ready: reset the network, then scan the window of the test and its
        reset. A problem taints the router (it is stopped at release)."""
        router = self._held()
        if router.alive and not router.tainted:
            try:
                router.reset()
            except Exception as exc:  # a broken reset means a broken VM: boot a new one
                log.warning("reset of %s failed, it will be replaced: %s", router.name, exc)
                router.tainted = f"reset failed: {getattr(exc, 'problem', exc)}"
        problem = router.health()
        if problem is not None:
            router.tainted = router.tainted or f"kernel health: {problem.pattern}"
        self.state = State.READY
        return problem

    def release(self) -> HealthProblem | None:
        """The test is over: a router that is tainted or gone is stopped, its last window
        scanned; a healthy one stays up for the next test of this case."""
        problem = self.end_test() if self.state is State.IN_TEST else None
        router = self.router
        if router is not None and (router.tainted or not router.alive):
            log.info("replacing %s: %s", router.name, router.tainted or "the VM exited")
            last = self.stop()
            problem = problem or last
        return problem

    def stop(self) -> HealthProblem | None:
        """Stop the lab's guests (-> off); the first problem in their last console windows."""
        problem = self.router.stop() if self.router is not None else None
        self._stop_launched()
        self.router = None
        if self.state is not State.BROKEN:
            self.state = State.OFF
        return problem

    def detach(self) -> tuple[Router, list[RunningMachine], Path] | None:
        """Hand the running lab over as it is (network state included) instead of stopping
        it: its router, machines and lab directory become the caller's (-> off here, so the
        case's next test boots a new lab). None when no lab is running."""
        if self.router is None or self._lab_dir is None:
            return None
        handed = (self.router, [launched.machine for launched in self._launched], self._lab_dir)
        for guest in self.router.guests.values():
            guest.channel.close()
        self.router, self._lab_dir = None, None
        self._launched.clear()
        self.state = State.OFF
        return handed

    # -- the boot, one transition at a time ---------------------------------------------------

    def _boot(self) -> None:
        try:
            for step in (self._image_ready, self._launch, self._channel_up):
                step()
            if self.restored:
                self._resync_clock()
            elif self.configure_network:
                self._network()
            self._ready()
            # a saved state is a networked lab: one without the test network is never saved
            if self._snapshot_key is not None and not self.restored and self.configure_network:
                self._save_snapshot(self._snapshot_key)
        except KmodtestError as exc:
            self._stop_launched()
            self.router = None
            self.state, self.broken = State.BROKEN, exc
            raise
        except BaseException:  # Ctrl-C mid-boot: nothing left running, try again next time
            self._stop_launched()
            self.router, self.state = None, State.OFF
            raise

    def _image_ready(self) -> None:
        self._plan = plan_for(self.case, self.images)
        self.state = State.IMAGE_READY

    def _launch(self) -> None:
        assert self._plan is not None
        log_dir = self.log_dir()
        # one short directory per lab (unix socket paths are <= 107 bytes): the links between
        # its guests live here, and each guest's own sockets in it (or in a role subdirectory)
        self._lab_dir = new_lab_dir()
        several = len(self._plan.nodes) > 1
        self.restored, self._snapshot_key = False, None
        for node in self._plan.nodes:
            run_dir = self._lab_dir / node.role if several else self._lab_dir
            run_dir.mkdir(exist_ok=True)
            spec = node.boot.machine_spec(
                f"{self.case.name}-{node.role}" if several else self.case.name,
                node.cell, node.image, node.nics(self._lab_dir), run_dir,
                log_dir / node.role if several else log_dir, self.accel, self.icount,
            )  # fmt: skip
            state = self._saved_state(spec)
            if state is not None and isinstance(self.launcher, SnapshotLauncher):
                machine: RunningMachine = self.launcher.restore(spec, state)
                self.restored = True
            else:
                machine = self.launcher.start(spec)
            self._launched.append(_Launched(node, spec, machine, time.monotonic()))
        self.state = State.LAUNCHED

    def _channel_up(self) -> None:
        guests = {}
        for launched in self._launched:
            spec, machine = launched.spec, launched.machine
            try:
                if self.restored:
                    assert isinstance(machine, SavableMachine)
                    channel = connect_restored(machine, self.boot_timeout)
                else:
                    channel = launched.node.boot.connect(machine, self.boot_timeout)
            except (ChannelError, MachineError) as exc:
                restored = ""
                if self.restored and self.snapshots and self._snapshot_key:
                    entry = self.snapshots.cache.path(SNAPSHOT_KIND, self._snapshot_key)
                    restored = f" (restoring the saved state {entry})"
                raise MachineError(
                    f"{spec.name} did not come up{restored}: {exc.problem}"
                    f"{death_note(machine, self.launcher.name)}",
                    f"see {spec.console_log} and the {self.launcher.name} log in {spec.log_dir}"
                    + ("; --no-snapshots boots without saved states" if restored else "")
                    + self._slow_boot_hint(exc),
                ) from None
            guest = GuestVM.connected(spec, machine, channel, time.monotonic() - launched.at)
            guests[launched.node.role] = guest
            log.info("%s up in %.2f s", spec.name, guest.boot_seconds)
        assert self._plan is not None
        self.router = Router(self.case.cell, self._plan.router.image, self._plan.network, guests)
        self.state = State.CHANNEL_UP

    def _network(self) -> None:
        router, began = self._held(), time.monotonic()
        try:
            router.network.setup(router.guests, self.boot_timeout)
        except (ChannelError, MachineError) as exc:
            raise MachineError(
                f"{router.name} did not come up: {exc.problem}"
                f"{death_note(router.vm.machine, self.launcher.name)}",
                f"see {router.console_log}{self._slow_boot_hint(exc)}",
            ) from None
        log.info("%s: test network set up in %.2f s", router.name, time.monotonic() - began)
        self.state = State.NETWORK_CONFIGURED

    def _slow_boot_hint(self, exc: KmodtestError) -> str:
        """A boot step that ran out of time on a slow (e.g. nested TCG) host is no fault:
        name the option that gives it more."""
        if not isinstance(exc, CommandTimeout):
            return ""
        return f"; a guest still busy may need more than --boot-timeout {self.boot_timeout:g}"

    def _resync_clock(self) -> None:
        """A restored guest's wall clock is the saved one's: set it to the host's. (Its
        monotonic clock, jiffies and pending timers resume where they were saved, so
        conntrack and flowtable timeouts run as in a booted guest.)"""
        router = self._held()
        for guest in router.guests.values():
            guest.check(f"date -u -s @{int(time.time())} >/dev/null")
        self.state = State.NETWORK_CONFIGURED

    def _saved_state(self, spec: MachineSpec) -> Path | None:
        """The saved state to restore ``spec`` from; remembers the key for saving one after
        a cold boot. Labs of one QEMU guest with emulated NICs only can have one."""
        assert self._plan is not None
        if (
            self.snapshots is None
            or not isinstance(self.launcher, SnapshotLauncher)
            or len(self._plan.nodes) != 1
            or any(isinstance(nic.link, HostPciLink) for nic in spec.nics)
        ):
            return None
        self._snapshot_key = self.snapshots.key(spec, self._plan.network)
        if self._snapshot_key in self.snapshots.failed:
            self._snapshot_key = None
            return None
        return self.snapshots.state(self._snapshot_key)

    def _save_snapshot(self, key: str) -> None:
        """Save the freshly booted, healthy lab for later VMs of this case. A failure to save
        is logged (and named in the run's list of VMs) and the booted VM is used as is."""
        assert self.snapshots is not None and self._plan is not None and self.router is not None
        assert isinstance(self.launcher, SnapshotLauncher)
        launched = self._launched[0]
        machine = launched.machine
        assert isinstance(machine, SavableMachine)
        node, log_dir = launched.node, launched.spec.log_dir / "snapshot-verify"

        def scratch_spec(run_dir: Path) -> MachineSpec:
            return node.boot.machine_spec(
                f"{self.case.name}-verify", node.cell, node.image, node.nics(run_dir), run_dir,
                log_dir, self.accel, self.icount,
            )  # fmt: skip

        try:
            fingerprint = self.router.vm.check(FINGERPRINT)
            self.snapshots.save(
                key, machine, self.launcher, scratch_spec, fingerprint, self.boot_timeout
            )
        except KmodtestError as exc:
            log.warning("%s: state not saved, later VMs boot cold: %s", self.case.name, exc)
            self.unsaved = exc.problem.splitlines()[0]
            self.snapshots.failed.setdefault(key, exc.problem)
        if not machine.alive:
            raise MachineError(f"{self.case.name}: the VM exited while its state was saved")

    def _ready(self) -> None:
        """The boot's own console window: a kernel problem while booting is a boot failure."""
        router = self._held()
        for guest in router.guests.values():  # forget what boot left to kmemleak (debug kernels)
            if guest.kmemleak is not None:
                guest.kmemleak.settle()
        if problem := router.health(leaks=False):
            raise MachineError(
                f"{router.name}: the kernel reported a problem while booting\n{problem}",
                f"see {router.console_log}",
            )
        self.state = State.READY

    # -- helpers --------------------------------------------------------------------------

    def _held(self) -> Router:
        if self.router is None:
            raise MachineError(f"{self.case.name} is not running")
        return self.router

    def _stop_launched(self) -> None:
        for launched in self._launched:
            launched.machine.stop()
        self._launched.clear()
        if self._lab_dir is not None:
            shutil.rmtree(self._lab_dir, ignore_errors=True)
            self._lab_dir = None
