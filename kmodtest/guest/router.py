"""A booted router VM: QEMU process + agent channel + testinfra Host + console watch.

This is the object fixtures hand to tests. It knows how to boot (with a deadline, failing fast
if QEMU or the kernel dies), how to put the network back between tests, and how to report its
kernel's health.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import testinfra.host

from kmodtest.errors import ChannelError, MachineError
from kmodtest.guest.backend import make_host
from kmodtest.guest.channel import AgentChannel, Reply, UnixSocketTransport
from kmodtest.guest.health import ConsoleWatch, HealthProblem, Kmemleak, tail
from kmodtest.guest.topology import Topology
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import Image
from kmodtest.run.launcher import Launcher, QemuLauncher, RunningMachine
from kmodtest.run.machine import MachineSpec

log = logging.getLogger(__name__)

# what /init prints when it finds no agent port (kmodtest/guest/files/init)
NO_AGENT_MESSAGE = "no virtio-serial port named org.kmodtest.agent"
BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core host; a healthy boot takes seconds


def kernel_cmdline(cell: Cell) -> str:
    # loglevel=5 keeps boot chatter off the (slow, emulated) serial line but still prints
    # WARNING/BUG/Oops splats, which the health check reads from the console log.
    # cryptomgr.notests and mitigations=off cut boot and syscall time under TCG; neither
    # changes what netfilter does.
    base = (
        f"console={cell.arch.console} panic=-1 loglevel=5 rdinit=/init "
        "cryptomgr.notests mitigations=off"
    )
    return f"{base} {cell.spec.append}".strip()


@dataclass
class RouterVM:
    cell: Cell
    image: Image
    topology: Topology
    spec: MachineSpec
    launcher: Launcher = field(default_factory=QemuLauncher)
    qemu: RunningMachine | None = None  # the running VM, whichever launcher started it
    channel: AgentChannel | None = None
    host: testinfra.host.Host | None = None
    watch: ConsoleWatch | None = None
    kmemleak: Kmemleak | None = None
    boot_seconds: float = 0.0
    tainted: str | None = None  # why this VM must not be reused

    @classmethod
    def create(
        cls,
        cell: Cell,
        image: Image,
        nic_model: str,
        log_dir: Path,
        accel: str = "tcg",
        icount: bool = False,
        launcher: Launcher | None = None,
    ) -> RouterVM:
        run_dir = Path(tempfile.mkdtemp(prefix="kt-"))  # short: unix socket path limit
        ports = cell.spec.passthrough.by_port() if cell.spec.passthrough else {}
        topology = Topology(nic_model, passthrough=ports)
        spec = MachineSpec(
            name=f"{cell.id}-{nic_model}",
            arch=cell.arch,
            machine=cell.machine,
            cpu=cell.cpu,
            memory_mb=cell.spec.memory_mb,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=kernel_cmdline(cell),
            run_dir=run_dir,
            log_dir=log_dir,
            accel=accel,
            icount=icount,
            nics=topology.nics(run_dir),
        )
        return cls(cell, image, topology, spec, launcher or QemuLauncher())

    @property
    def console_log(self) -> Path:
        return self.spec.console_log

    @property
    def alive(self) -> bool:
        return self.qemu is not None and self.qemu.alive

    def start(self, timeout: float = BOOT_TIMEOUT) -> RouterVM:
        """Boot and wait for the first command to answer; on any failure nothing is left running."""
        start = time.monotonic()
        try:
            self.qemu = self.launcher.start(self.spec)
        except BaseException:  # its own message (e.g. "not installed, fix: ..."); no run dir left
            self.stop()
            raise
        self.watch = ConsoleWatch(self.console_log)
        try:
            transport = UnixSocketTransport.connect(
                self.spec.agent_socket, timeout=30, alive=lambda: self.alive
            )
            self.channel = AgentChannel(transport, alive=self._booting)
            self.channel.run("true", timeout=timeout)
            self.channel.alive = lambda: self.alive
            self.boot_seconds = time.monotonic() - start
            self.host = make_host(self.channel, self.spec.name)
            self.check(self.topology.setup_script(), timeout=60)
            self.kmemleak = Kmemleak(self._status_and_output)
            self.kmemleak.settle()
        except (ChannelError, MachineError) as exc:
            why = self._death_note()
            self.stop()
            raise MachineError(
                f"{self.spec.name} did not come up: {exc.problem}{why}",
                f"see {self.console_log} and the {self.launcher.name} log in {self.spec.log_dir}",
            ) from None
        except BaseException:
            self.stop()
            raise
        log.info("%s up in %.2f s", self.spec.name, self.boot_seconds)
        return self

    def _booting(self) -> bool:
        """The channel's liveness check while booting: QEMU runs and /init has not given up.

        /init says on the console when it finds no agent port; waiting out the boot timeout
        after that would only hide the reason.
        """
        try:
            console = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            console = ""
        if NO_AGENT_MESSAGE in console:
            raise MachineError(f"/init reported: {NO_AGENT_MESSAGE} (the guest cannot answer)")
        return self.alive

    def _death_note(self) -> str:
        parts = []
        if self.qemu is not None and not self.qemu.alive:
            rc = self.qemu.returncode
            status = "" if rc is None else f" with {rc}"
            parts.append(f"\n{self.launcher.name}: the VM exited{status}")
            if err := self.qemu.stderr_text():
                parts.append(f"{self.launcher.name} said: {err[-800:]}")
        parts.append(f"last console lines:\n{tail(self.console_log)}")
        return "\n".join(parts)

    def run(self, command: str, timeout: float = 120.0) -> Reply:
        if self.channel is None:
            raise MachineError(f"{self.spec.name} is not running")
        return self.channel.run(command, timeout=timeout)

    def check(self, command: str, timeout: float = 120.0) -> str:
        """Run a command that must succeed; raise with its output if it does not."""
        reply = self.run(command, timeout)
        if reply.exit_status != 0:
            raise MachineError(
                f"guest command failed (exit {reply.exit_status}): {command.strip()[:300]}\n"
                f"stdout: {reply.stdout.decode(errors='replace')[-1500:]}\n"
                f"stderr: {reply.stderr.decode(errors='replace')[-1500:]}"
            )
        return reply.stdout.decode(errors="replace")

    def reset(self) -> None:
        """Between tests: flush ruleset and conntrack, restore links, addresses and routes."""
        self.check(self.topology.reset_script(), timeout=60)

    def _status_and_output(self, command: str) -> tuple[int, str]:
        reply = self.run(command, timeout=120)
        return reply.exit_status, reply.stdout.decode(errors="replace")

    def health(self) -> HealthProblem | None:
        if self.watch is None:
            return None
        problem = self.watch.scan()
        if problem is None and not self.alive:
            return HealthProblem("QEMU exited", tail(self.console_log))
        if problem is None and self.kmemleak is not None:
            problem = self.kmemleak.check()
        return problem

    def kernel_release(self) -> str:
        return self.check("uname -r").strip()

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.qemu is not None:
            self.qemu.stop()
        shutil.rmtree(self.spec.run_dir, ignore_errors=True)
