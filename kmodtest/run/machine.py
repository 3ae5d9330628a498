"""What a VM is, independent of how it is launched.

A :class:`MachineSpec` is plain data (cpu, memory, kernel, initrd, disks, firmware, NICs and
their links, the agent channel, the console); launchers turn it into a QEMU argv today and into
libvirt domain XML later. It can be checked without booting anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.arches import Arch
from kmodtest.nics import get_nic


@dataclass(frozen=True)
class DgramLink:
    """One end of a point-to-point Ethernet link: QEMU ``-netdev dgram`` over unix sockets.

    Unix datagram sockets need no root and no free port numbers, so parallel VMs (pytest-xdist)
    can never collide as long as their run directories differ.
    """

    local: Path
    remote: Path


@dataclass(frozen=True)
class HostPciLink:
    """A host NIC (one PCI function) handed to the guest through VFIO: the cable is real.

    ``guest_slot`` pins the device on the guest's root bus, which is how the guest finds it
    (a passthrough NIC keeps its own MAC address, which the host does not know in advance).
    """

    host: str  # full PCI address on the host, e.g. 0000:03:00.0
    guest_slot: int


@dataclass(frozen=True)
class Nic:
    name: str  # role and guest interface name: lan, wan, client0, server0
    model: str  # QEMU device model: virtio-net-pci, e1000, ...; vfio-pci for passthrough
    mac: str
    link: DgramLink | HostPciLink


# the first root-bus slot for NICs: pc has its host bridge in slot 0, the PIIX3 in 1 and our
# virtio-serial controller in 2; arm's virt machine only its host bridge in 0
FIRST_NIC_SLOT = 3


def nic_slot(nics: Sequence[Nic], nic: Nic) -> int:
    """The root-bus slot of emulated ``nic``: next to the one before it, or as far apart as
    its model needs (:attr:`kmodtest.nics.NicModel.pci_slots`)."""
    emulated = [n for n in nics if not isinstance(n.link, HostPciLink)]
    return FIRST_NIC_SLOT + emulated.index(nic) * get_nic(nic.model).pci_slots


@dataclass(frozen=True)
class Disk:
    """A block device: always a private file (a qcow2 overlay), never a cached original."""

    path: Path
    format: str = "qcow2"  # qcow2 | raw
    bus: str = "virtio"  # QEMU -drive if=: virtio (OpenWrt's qemustart uses it too)


@dataclass(frozen=True)
class MachineSpec:
    name: str
    arch: Arch
    machine: str
    cpu: str
    memory_mb: int
    kernel: Path | None  # None: the firmware boots from the first disk (SeaBIOS -> GRUB)
    initrd: Path | None
    cmdline: str | None  # None: no -append (a kernel whose device tree names its console)
    run_dir: Path  # sockets; keep the path short (unix socket paths are <= 107 bytes)
    log_dir: Path  # console log and friends; survives the VM
    accel: str = "tcg"  # "kvm" or "tcg"
    smp: int = 1
    icount: bool = False  # -icount shift=0,sleep=off: guest time follows instructions
    nics: tuple[Nic, ...] = field(default=())
    disks: tuple[Disk, ...] = field(default=())
    firmware: Path | None = None  # -bios FILE; None: the machine's default (SeaBIOS on pc)
    # the console also takes input (a unix socket; output still logged to console_log): for
    # images whose agent is started by typing at a shell (OpenWrt)
    console_input: bool = False

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"
