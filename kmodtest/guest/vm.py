"""A running guest as tests talk to it: machine + agent channel + testinfra Host + console watch.

Whichever launcher started the machine and whichever :class:`~kmodtest.guest.boot.Boot`
brought its agent up, a :class:`GuestVM` looks the same; the router and an endpoints VM are
both one. Starting and stopping labs of them is the lifecycle's job (:mod:`kmodtest.lifecycle`).
"""

from __future__ import annotations

import logging
import shutil
import signal
from dataclasses import dataclass

import testinfra.host

from kmodtest.errors import ChannelError, CommandTimeout, MachineError
from kmodtest.guest.backend import make_host
from kmodtest.guest.channel import AgentChannel, Reply
from kmodtest.guest.health import ConsoleWatch, HealthProblem, Kmemleak, sync_command, tail
from kmodtest.run.launcher import RunningMachine
from kmodtest.run.machine import MachineSpec

log = logging.getLogger(__name__)
SYNC_TIMEOUT = 30.0  # seconds for a /dev/kmsg line to reach the console file


@dataclass
class GuestVM:
    spec: MachineSpec
    machine: RunningMachine
    channel: AgentChannel
    host: testinfra.host.Host
    console: ConsoleWatch
    boot_seconds: float
    kmemleak: Kmemleak | None = None  # made by connected(); settled once the guest is set up

    @classmethod
    def connected(
        cls, spec: MachineSpec, machine: RunningMachine, channel: AgentChannel, seconds: float
    ) -> GuestVM:
        """The guest once its agent answered (``seconds`` after the launch)."""
        host = make_host(channel, spec.name)
        guest = cls(spec, machine, channel, host, ConsoleWatch(spec.console_log), seconds)
        guest.kmemleak = Kmemleak(guest.status_and_output)
        return guest

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        return self.machine.alive

    def run(self, command: str, timeout: float = 120.0) -> Reply:
        try:
            return self.channel.run(command, timeout=timeout)
        except ChannelError as exc:
            if self.alive or isinstance(exc, CommandTimeout):
                raise
            raise MachineError(  # the machine died under the command: say how, and where
                f"{self.name}: {exc.problem}{death_note(self.machine, 'QEMU')}",
                f"see {self.spec.console_log} and {self.spec.log_dir}",
            ) from None

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

    def sync_console(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Return once everything the guest's kernel logged so far is in the console file."""
        command, line = sync_command()
        try:
            self.channel.run(command, timeout=10)
        except ChannelError as exc:
            log.warning("%s: console sync failed: %s", self.name, exc.problem)
            return
        if not self.console.wait_for(line, timeout):
            log.warning("%s: console sync line not seen in %.0f s", self.name, timeout)

    def status_and_output(self, command: str) -> tuple[int, str]:
        reply = self.run(command, timeout=120)
        return reply.exit_status, reply.stdout.decode(errors="replace")

    def health(self, leaks: bool = True) -> HealthProblem | None:
        """The first problem in the console since the last scan, up to now; if the machine
        died, in all of what it wrote (and its death is the problem when nothing else is).
        Then, with ``leaks``, kmemleak's findings on kernels that have it."""
        if self.alive:
            self.sync_console()
        if not self.alive:
            return self.console.scan(final=True) or HealthProblem(
                f"{self.spec.name} exited{exit_reason(self.machine)}", tail(self.spec.console_log)
            )
        problem = self.console.scan()
        if problem is None and leaks and self.kmemleak is not None:
            problem = self.kmemleak.check()
        return problem

    def stop(self) -> HealthProblem | None:
        """Stop the machine for good; the console's last window (through a sync line, while
        the guest still answers) is scanned once it is gone."""
        try:
            if self.alive and not self.channel.closed:
                self.sync_console(timeout=5.0)
        finally:  # also on Ctrl-C: nothing left running
            self.channel.close()
            _stop(self.machine, self.spec)
        return self.console.scan(final=True)


def _stop(machine: RunningMachine, spec: MachineSpec) -> None:
    machine.stop()
    shutil.rmtree(spec.run_dir, ignore_errors=True)


def exit_reason(machine: RunningMachine) -> str:
    """How a machine ended, to follow "exited": its status, or the signal that killed it."""
    rc = machine.returncode
    if rc is not None and rc < 0:  # a signal: name it (SIGKILL is the OOM killer, or kill -9)
        return f", killed by {signal.Signals(-rc).name}"
    return "" if rc is None else f" with {rc}"


def death_note(machine: RunningMachine, launcher: str) -> str:
    """Why a machine is gone, for an error message: exit status, hypervisor output, console."""
    parts = []
    if not machine.alive:
        parts.append(f"\n{launcher}: the VM exited{exit_reason(machine)}")
        if err := machine.stderr_text():
            parts.append(f"{launcher} said: {err[-800:]}")
    parts.append(f"last console lines:\n{tail(machine.spec.console_log)}")
    return "\n".join(parts)
