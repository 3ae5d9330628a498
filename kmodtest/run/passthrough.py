"""Can these host NICs be passed through to a guest here? Every missing prerequisite, by name.

Checked before a passthrough VM case starts, so its tests skip with the exact reason instead of
failing inside QEMU or libvirt. The checks read sysfs and /dev (``root`` is a parameter so the
logic is tested against a made-up tree too):

1. the IOMMU is on (``/sys/kernel/iommu_groups`` has groups);
2. each address names a PCI network controller;
3. its IOMMU group holds nothing else still bound to a host driver (the whole group goes to
   the guest; PCI bridges are fine);
4. QEMU backend: the device is bound to vfio-pci and ``/dev/vfio/<group>`` is read-write for
   us; libvirt backend (``managed='yes'`` rebinds it itself): vfio-pci is available;
5. the guest image has the device's driver (:func:`missing_guest_driver`, once it is built).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kmodtest.errors import KmodtestError

NETWORK_CLASS = 0x02  # PCI base class "network controller"
BRIDGE_CLASS = 0x0604
HARMLESS_DRIVERS = {None, "vfio-pci", "pci-stub", "pcieport"}


@dataclass(frozen=True)
class PciDevice:
    address: str
    root: Path = Path("/")

    @property
    def sysfs(self) -> Path:
        return self.root / "sys/bus/pci/devices" / self.address

    def exists(self) -> bool:
        return self.sysfs.is_dir()

    def _read(self, name: str) -> str:
        return (self.sysfs / name).read_text().strip()

    @property
    def pci_class(self) -> int:
        return int(self._read("class"), 16) >> 8  # 0x020000 -> 0x0200

    @property
    def ids(self) -> str:
        return f"{self._read('vendor')[2:]}:{self._read('device')[2:]}"

    @property
    def driver(self) -> str | None:
        link = self.sysfs / "driver"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    @property
    def iommu_group(self) -> str | None:
        link = self.sysfs / "iommu_group"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def group_members(self) -> list[PciDevice]:
        group = self.iommu_group
        if group is None:
            return []
        devices = self.root / "sys/kernel/iommu_groups" / group / "devices"
        return [PciDevice(p.name, self.root) for p in sorted(devices.iterdir())]


def _rebind_fix(address: str) -> str:
    dev = f"/sys/bus/pci/devices/{address}"
    return (
        f"modprobe vfio-pci; echo vfio-pci > {dev}/driver_override; "
        f"echo {address} > {dev}/driver/unbind; echo {address} > /sys/bus/pci/drivers_probe"
    )


def _vfio_pci_available(root: Path) -> bool:
    if (root / "sys/bus/pci/drivers/vfio-pci").is_dir():
        return True
    if root != Path("/"):
        return False
    found = subprocess.run(["modinfo", "-n", "vfio-pci"], capture_output=True, check=False)
    return found.returncode == 0


def missing_prerequisites(
    addresses: Iterable[str], backend: str, root: Path = Path("/")
) -> list[str]:
    """What keeps ``addresses`` from being passed through here; empty when nothing does."""
    addresses = list(addresses)
    groups = root / "sys/kernel/iommu_groups"
    problems: list[str] = []
    iommu_on = groups.is_dir() and any(groups.iterdir())
    if not iommu_on:
        problems.append(
            "the host IOMMU is off (/sys/kernel/iommu_groups is empty): enable VT-d/AMD-Vi in "
            "the firmware and boot the host with intel_iommu=on (or amd_iommu=on) iommu=pt"
        )
    if backend == "libvirt" and not _vfio_pci_available(root):
        problems.append("the vfio-pci driver is not available on the host: modprobe vfio-pci")
    for address in addresses:
        device = PciDevice(address, root)
        if not device.exists():
            problems.append(f"no PCI device {address} on this host (lspci -D lists them)")
            continue
        if device.pci_class >> 8 != NETWORK_CLASS:
            problems.append(f"{address} is not a network controller (class {device.pci_class:04x})")
        if not iommu_on:
            continue
        group = device.iommu_group
        if group is None:
            problems.append(f"{address} is in no IOMMU group (is the IOMMU on for it?)")
            continue
        for other in device.group_members():
            if other.address in addresses or other.driver in HARMLESS_DRIVERS:
                continue
            if other.exists() and other.pci_class == BRIDGE_CLASS:
                continue
            problems.append(
                f"IOMMU group {group} of {address} also holds {other.address} (driver "
                f"{other.driver}): pass it through too, or bind it to vfio-pci"
            )
        if backend == "qemu":
            if device.driver != "vfio-pci":
                problems.append(
                    f"{address} is bound to {device.driver or 'no driver'}, not vfio-pci "
                    f"(the QEMU backend does not rebind; libvirt's managed hostdev does): "
                    f"{_rebind_fix(address)}"
                )
            node = root / "dev/vfio" / group
            if not node.exists():
                problems.append(f"{node} does not exist (vfio-pci not bound to group {group})")
            elif not os.access(node, os.R_OK | os.W_OK):
                problems.append(f"{node} is not read-write for uid {os.getuid()}")
    return problems


def host_driver(device: PciDevice) -> str | None:
    """The driver the guest will need: the host's own, or what the modalias resolves to."""
    if device.driver not in (None, "vfio-pci", "pci-stub"):
        return device.driver
    try:
        alias = (device.sysfs / "modalias").read_text().strip()
        out = subprocess.run(
            ["modprobe", "-R", alias], capture_output=True, text=True, check=False
        ).stdout.split()
    except OSError:
        return None
    return next((m for m in out if m not in ("vfio_pci", "pci_stub")), None)


class PassthroughUnavailable(KmodtestError):
    """A passthrough case cannot run here; the router fixture turns this into a skip."""


def missing_guest_driver(
    addresses: Mapping[str, str], image_modules: Iterable[str], root: Path = Path("/")
) -> str | None:
    """Why the image cannot drive these NICs, or None (also when the host cannot tell)."""
    have = {m.replace("-", "_") for m in image_modules}
    for port, address in addresses.items():
        device = PciDevice(address, root)
        if not device.exists():
            continue
        driver = host_driver(device)
        if driver is not None and driver.replace("-", "_") not in have:
            return (
                f"the guest image has no {driver} module for {port} port {address} "
                f"({device.ids}): add it to the recipe's modules (images/debian-router.yaml)"
            )
    return None
