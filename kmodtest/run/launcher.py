"""How a :class:`MachineSpec` becomes a running machine: the seam between backends.

QEMU as a subprocess is one launcher; libvirt (a transient domain rendered from the same spec)
is another. Everything above this module (channel, Host, health, lifecycle) talks to a
:class:`RunningMachine` and never asks which launcher made it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from kmodtest.errors import ConfigError
from kmodtest.run.machine import MachineSpec


class RunningMachine(Protocol):
    """A started VM: its agent socket and console log are where ``spec`` says."""

    spec: MachineSpec

    @property
    def alive(self) -> bool: ...

    @property
    def returncode(self) -> int | None:
        """The exit status once the VM is gone (None while it runs or when unknown)."""

    def stderr_text(self) -> str:
        """What the hypervisor said (QEMU's stderr, libvirt's domain log), for error reports."""

    def stop(self) -> int | None:
        """Stop the VM for good and release everything it held; idempotent."""


class Launcher(Protocol):
    name: str  # "qemu", "libvirt": what --backend selects

    def check(self) -> None:
        """Raise (with the fix) now if this launcher cannot start VMs here, before any test."""

    def start(self, spec: MachineSpec) -> RunningMachine: ...


@runtime_checkable
class SavableMachine(RunningMachine, Protocol):
    """A machine whose whole state can be written to a file and loaded into a new one."""

    def save(self, path: Path) -> None:
        """Pause, write the state to ``path``, resume."""

    def resume(self) -> None:
        """A restored machine waits paused until this (so its agent can connect first)."""


@runtime_checkable
class SnapshotLauncher(Launcher, Protocol):
    """A launcher that can also start a machine from a saved state (QEMU: migration files)."""

    def restore(self, spec: MachineSpec, state: Path) -> SavableMachine:
        """Start ``spec``'s devices loading ``state``, paused until ``resume()``."""


class QemuLauncher:
    """QEMU as a registered child process (see :mod:`kmodtest.run.qemu`)."""

    name = "qemu"
    detachable = False  # VMs that may be kept running after the run (--keep-vm-on-failure)

    def __init__(self, detachable: bool = False) -> None:
        self.detachable = detachable

    def check(self) -> None:
        """QEMU binaries are checked per cell (a missing one skips or fails that cell)."""

    def start(self, spec: MachineSpec) -> RunningMachine:
        from kmodtest.run.qemu import QemuProcess

        return QemuProcess.start(spec, detachable=self.detachable)

    def restore(self, spec: MachineSpec, state: Path) -> SavableMachine:
        from kmodtest.run.qemu import QemuProcess

        return QemuProcess.start(spec, state, detachable=self.detachable)


BACKENDS = ("qemu", "libvirt")


def make_launcher(
    backend: str, libvirt_uri: str | None = None, detachable: bool = False
) -> Launcher:
    """The launcher ``--backend`` (or a cell's ``backend:``) names; ``detachable``: its VMs
    may be left running when the run ends (``--keep-vm-on-failure``; QEMU only)."""
    if backend == "libvirt":
        if detachable:
            raise ConfigError(
                "a libvirt VM cannot be kept after the run (it is a transient domain that "
                "libvirtd destroys when the run's connection closes)",
                "use --backend qemu with --keep-vm-on-failure",
            )
        from kmodtest.run.libvirt_launcher import DEFAULT_URI, LibvirtLauncher

        return LibvirtLauncher(libvirt_uri or DEFAULT_URI)
    if backend == "qemu":
        return QemuLauncher(detachable)
    raise ConfigError(f"unknown backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
