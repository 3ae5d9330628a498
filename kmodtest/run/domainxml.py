"""A :class:`MachineSpec` as libvirt domain XML: the same VM the QEMU launcher starts.

Plain data in, a string out (deterministic, so it is golden-tested and checked with
``virt-xml-validate`` without booting). Where libvirt has no form for what the QEMU argv does,
the nearest form that needs no root is used:

- ``-netdev dgram`` over unix sockets has no libvirt form: each link becomes a TCP connection
  on 127.0.0.1, one end ``<interface type='server'>`` listening on the link's port (``ports``),
  the other ``type='client'``. A stream, like the unix datagram sockets, pushes back on a
  sender whose peer is slow; ``<interface type='udp'>`` cannot. (UDP transfers through e1000
  still arrive incomplete under this backend with either form: see README, open);
- ``-no-reboot`` is ``on_reboot=destroy`` (a panicking guest with ``panic=-1`` is gone at once);
- QEMU's ``-cpu max`` is ``<cpu mode='maximum'>`` under TCG, ``host-passthrough`` under KVM;
  a CPU option libvirt cannot say (arm64's ``pauth=off``) becomes the arch's ``libvirt_cpu``;
- on x86's ``pc`` machine every device sits in the PCI slot QEMU gives it in our argv (the
  virtio-serial controller in slot 2, the NICs from slot 3 in order). libvirt's own placement
  (NICs first) changes which e1000s share an INTx line, and with it how the guest services
  them: see :data:`FIRST_FREE_SLOT`.

No ``<qemu:commandline>``: it taints the domain, and nothing here needs it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kmodtest.errors import ConfigError
from kmodtest.run.emulator import qemu_binary
from kmodtest.run.machine import DgramLink, HostPciLink, MachineSpec, Nic, nic_slot
from kmodtest.run.qemu import AGENT_PORT_NAME

METADATA_NS = "urn:kmodtest:domain:1"  # marks domains kmodtest started (owner pid, run dir)
LOOPBACK = "127.0.0.1"
# QEMU -device name -> libvirt <model type>, where they differ
NIC_MODELS = {"virtio-net-pci": "virtio"}
# Machines whose root bus is conventional PCI: the first slot QEMU gives a -device of ours
# (pc: 0 is the host bridge, 1 the PIIX3 ISA/IDE/USB/ACPI function). QEMU fills slots in argv
# order from here: virtio-serial first, then the NICs. On arm's virt (PCIe root) libvirt puts
# each device behind a root port and conventional-PCI e1000s behind a bridge; it has no form
# for QEMU's plain pcie.0 placement, so those keep libvirt's addresses.
FIRST_FREE_SLOT = {"pc": 2}


@dataclass(frozen=True)
class Owner:
    """Who started the domain: written into <metadata> so leftovers can be traced to a run."""

    pid: int
    run_dir: Path


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def link_keys(spec: MachineSpec) -> list[frozenset[Path]]:
    """Each link of the spec (its two socket paths), in a stable order: one TCP port each."""
    keys: list[frozenset[Path]] = []
    for nic in spec.nics:
        if isinstance(nic.link, DgramLink):
            key = frozenset((nic.link.local, nic.link.remote))
            if key not in keys:
                keys.append(key)
    return keys


def _cpu(domain: ET.Element, spec: MachineSpec) -> None:
    if spec.accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough", check="none")
        return
    arch = spec.arch
    text = arch.libvirt_cpu if arch.libvirt_cpu and spec.cpu == arch.cpu else spec.cpu
    model, *options = text.split(",")
    if model == "max":
        cpu = _sub(domain, "cpu", mode="maximum", check="none")
    else:
        cpu = _sub(domain, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", model, fallback="forbid")
    for option in options:
        name, _, value = option.partition("=")
        if value not in ("on", "off"):
            raise ConfigError(
                f"cpu option {option!r} of {spec.cpu!r} has no libvirt form",
                "use feature=on|off options only, or run this cell with --backend qemu",
            )
        _sub(cpu, "feature", policy="require" if value == "on" else "disable", name=name)


def _pci_address(parent: ET.Element, bdf: str, slot: int | None = None) -> None:
    domain, bus, rest = bdf.split(":")
    dev, function = rest.split(".")
    _sub(
        parent,
        "address",
        **({"type": "pci"} if slot is not None else {}),
        domain=f"0x{domain}",
        bus=f"0x{bus}" if slot is None else "0x00",
        slot=f"0x{dev}" if slot is None else f"{slot:#04x}",
        function=f"0x{function}" if slot is None else "0x0",
    )


def _slot(parent: ET.Element, slot: int | None) -> None:
    """Pin a device to ``slot`` on the root bus (None: leave it to libvirt)."""
    if slot is not None:
        _pci_address(parent, "0000:00:00.0", slot=slot)


def _nic(devices: ET.Element, nic: Nic, ports: Mapping[frozenset[Path], int],
         listening: set[frozenset[Path]], slot: int | None) -> None:  # fmt: skip
    if isinstance(nic.link, HostPciLink):
        hostdev = _sub(devices, "hostdev", mode="subsystem", type="pci", managed="yes")
        source = _sub(hostdev, "source")
        _pci_address(source, nic.link.host)
        _sub(hostdev, "alias", name=f"ua-{nic.name}")
        _pci_address(hostdev, "0000:00:00.0", slot=nic.link.guest_slot)
        return
    key = frozenset((nic.link.local, nic.link.remote))
    role = "client" if key in listening else "server"  # the first end of a link listens
    listening.add(key)
    iface = _sub(devices, "interface", type=role)
    _sub(iface, "mac", address=nic.mac)
    _sub(iface, "source", address=LOOPBACK, port=str(ports[key]))
    _sub(iface, "model", type=NIC_MODELS.get(nic.model, nic.model))
    _sub(iface, "alias", name=f"ua-{nic.name}")
    _sub(iface, "rom", enabled="no")  # as romfile=: no PXE option ROM, faster boot
    _slot(iface, slot)


def domain_xml(
    spec: MachineSpec, ports: Mapping[frozenset[Path], int], name: str, owner: Owner | None = None
) -> str:
    """The transient domain for ``spec``; ``ports`` maps each of :func:`link_keys` to a port."""
    if spec.icount:
        raise ConfigError(
            "--icount has no libvirt form (libvirt does not expose -icount)",
            "drop --icount, or use --backend qemu",
        )
    if spec.arch.extra_args:
        raise ConfigError(
            f"arch {spec.arch.name} needs extra QEMU arguments {spec.arch.extra_args}, "
            "which have no libvirt form",
            "use --backend qemu for this cell",
        )
    if spec.kernel is None or spec.cmdline is None or spec.disks or spec.console_input:
        raise ConfigError(
            f"{name}: a firmware boot, disks and a console that takes input (OpenWrt images) "
            "have no libvirt form in kmodtest yet",
            "use --backend qemu for OpenWrt cells",
        )
    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(domain, "name", name)
    if owner is not None:
        metadata = _sub(domain, "metadata")
        ET.SubElement(
            metadata,
            f"{{{METADATA_NS}}}owner",
            pid=str(owner.pid),
            run_dir=str(owner.run_dir),
        )
    _sub(domain, "memory", str(spec.memory_mb), unit="MiB")
    _sub(domain, "vcpu", str(spec.smp))
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch=spec.arch.libvirt_arch, machine=spec.machine)
    _sub(os_, "kernel", str(spec.kernel))
    if spec.initrd:
        _sub(os_, "initrd", str(spec.initrd))
    _sub(os_, "cmdline", spec.cmdline)
    if spec.arch.acpi:
        _sub(_sub(domain, "features"), "acpi")
    _cpu(domain, spec)
    _sub(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")
    devices = _sub(domain, "devices")
    if os.sep in (command := qemu_binary(spec.arch)):  # else libvirt's own default emulator
        _sub(devices, "emulator", command)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log), append="off")
    _sub(serial, "target", port="0")
    first = FIRST_FREE_SLOT.get(spec.machine)
    _slot(_sub(devices, "controller", type="virtio-serial", index="0"), first)
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(spec.agent_socket))
    _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    listening: set[frozenset[Path]] = set()
    emulated = [nic for nic in spec.nics if not isinstance(nic.link, HostPciLink)]
    for nic in spec.nics:
        slot = None if first is None or nic not in emulated else nic_slot(spec.nics, nic)
        _nic(devices, nic, ports, listening, slot)
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    ET.register_namespace("kmodtest", METADATA_NS)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"
