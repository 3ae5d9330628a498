"""How a machine boots until its agent answers: one :class:`Boot` per kind of image.

Images kmodtest builds boot with QEMU's direct kernel boot, and their ``/init`` starts the
agent on its own virtio-serial port (:class:`DirectBoot`). An image kmodtest did not build (an
OpenWrt disk) is another ``Boot``: it boots its own way and gets the agent started by driving
the serial console. Everything after "channel up" does not ask which kind it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kmodtest.errors import MachineError
from kmodtest.guest.channel import AgentChannel, UnixSocketTransport
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import Image
from kmodtest.run.launcher import RunningMachine, SavableMachine
from kmodtest.run.machine import Disk, MachineSpec, Nic

BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core host; a healthy boot takes seconds
# what /init prints when it finds no agent port (kmodtest/guest/files/init)
NO_AGENT_MESSAGE = "no virtio-serial port named org.kmodtest.agent"


def kernel_cmdline(cell: Cell) -> str:
    # loglevel=5 keeps boot chatter off the (slow, emulated) serial line but still prints
    # WARNING/BUG/Oops splats, which the health check reads from the console log.
    # printk.devkmsg=on: the health check's console sync lines (/dev/kmsg) are never
    # rate-limited away. cryptomgr.notests and mitigations=off cut boot and syscall time under
    # TCG; neither changes what netfilter does. Then the arch's own (x86: acpi=off), then the
    # cell's ``append``, last so that it can override either.
    base = (
        f"console={cell.arch.console} panic=-1 loglevel=5 rdinit=/init printk.devkmsg=on "
        "cryptomgr.notests mitigations=off"
    )
    return " ".join(part for part in (base, cell.arch.cmdline, cell.spec.append) if part)


def cell_machine(
    cell: Cell, name: str, nics: tuple[Nic, ...], run_dir: Path, log_dir: Path, accel: str,
    icount: bool, *, kernel: Path | None, initrd: Path | None, cmdline: str | None,
    disks: tuple[Disk, ...] = (), console_input: bool = False,
) -> MachineSpec:  # fmt: skip
    """The cell's machine (arch, board, CPU, memory) with what one kind of image boots from:
    the one place a :class:`Boot` turns a cell into a :class:`MachineSpec`."""
    return MachineSpec(
        name=name,
        arch=cell.arch,
        machine=cell.machine,
        cpu=cell.cpu,
        smp=cell.smp,
        memory_mb=cell.spec.memory_mb,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        run_dir=run_dir,
        log_dir=log_dir,
        accel=accel,
        icount=icount,
        nics=nics,
        disks=disks,
        console_input=console_input,
    )


class Boot(Protocol):
    """What one kind of image needs: its machine description, and how its agent comes up."""

    def machine_spec(
        self, name: str, cell: Cell, image: Image, nics: tuple[Nic, ...], run_dir: Path,
        log_dir: Path, accel: str, icount: bool,
    ) -> MachineSpec: ...  # fmt: skip

    def connect(self, machine: RunningMachine, timeout: float) -> AgentChannel:
        """Wait until the agent answers its first command; raise MachineError/ChannelError."""


class DirectBoot:
    """Kernel + initramfs booted directly; ``/init`` starts the agent on virtio-serial."""

    def machine_spec(
        self, name: str, cell: Cell, image: Image, nics: tuple[Nic, ...], run_dir: Path,
        log_dir: Path, accel: str, icount: bool,
    ) -> MachineSpec:  # fmt: skip
        return cell_machine(
            cell, name, nics, run_dir, log_dir, accel, icount,
            kernel=image.kernel, initrd=image.initrd, cmdline=kernel_cmdline(cell),
        )  # fmt: skip

    def connect(self, machine: RunningMachine, timeout: float) -> AgentChannel:
        def alive() -> bool:
            return machine.alive

        transport = UnixSocketTransport.connect(machine.spec.agent_socket, 30, alive)
        channel = AgentChannel(transport, alive=lambda: _booting(machine))
        channel.run("true", timeout=timeout)
        channel.alive = alive
        return channel


def connect_restored(machine: SavableMachine, timeout: float) -> AgentChannel:
    """The agent of a machine restored from a saved state: whatever booted it, the guest is
    up already. The agent socket is connected while the guest is still paused, then it runs:
    the agent never sees its host side closed, so its first command answers at once."""

    def alive() -> bool:
        return machine.alive

    transport = UnixSocketTransport.connect(machine.spec.agent_socket, 30, alive)
    channel = AgentChannel(transport, alive=alive)
    try:
        machine.resume()
        channel.run("true", timeout=timeout)
    except BaseException:
        channel.close()
        raise
    return channel


def _booting(machine: RunningMachine) -> bool:
    """The channel's liveness check while booting: QEMU runs and /init has not given up.

    /init says on the console when it finds no agent port; waiting out the boot timeout after
    that would only hide the reason.
    """
    try:
        console = machine.spec.console_log.read_text(errors="replace")
    except FileNotFoundError:
        console = ""
    if NO_AGENT_MESSAGE in console:
        raise MachineError(f"/init reported: {NO_AGENT_MESSAGE} (the guest cannot answer)")
    return machine.alive
