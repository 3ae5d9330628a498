"""Each CPU architecture as a small record of data (like KUnit's ``qemu_configs/<arch>.py``).

Adding an architecture is adding a record here; nothing else switches on the arch name: QEMU
(binary, machine, cpu, console), Debian (dpkg arch, where kernel packages put the image), the
host (which machines run it natively or under KVM, how to prove KVM works) and kbuild (ARCH=,
cross compiler, image target, the kconfig lines its QEMU machine needs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kmodtest.errors import ConfigError

# where Debian's linux-image packages put the kernel file, tried in order
DEBIAN_KERNEL_GLOB = ("boot/vmlinuz-*", "usr/lib/modules/*/vmlinuz")


@dataclass(frozen=True)
class KvmProbe:
    """A tiny firmware that makes QEMU exit with ``exit_status`` once the guest ran it: proof
    that KVM really executes guest code (``/dev/kvm`` existing is not enough on nested hosts)."""

    machine: str
    firmware: bytes
    devices: tuple[str, ...]
    exit_status: int


@dataclass(frozen=True)
class KernelBuild:
    """How kbuild names the arch, and what its QEMU machine needs in a minimal kernel."""

    karch: str  # ARCH=
    image: str  # make target, and arch/<karch>/boot/<image>
    kconfig: tuple[str, ...]  # CONFIG_ lines on top of the suite's common fragment
    # GNU triplet of Debian's toolchain for the arch: its binutils and versioned gccs are
    # <triplet>-<tool> on every host (the module loop's CROSS_COMPILE, native or cross)
    triplet: str = ""
    cross: bool = False  # ``kmodtest kernel build`` on an amd64 host needs the cross gcc

    @property
    def tool_prefix(self) -> str:
        """What names Debian's tools for the arch: ``aarch64-linux-gnu-`` (gcc-14, ld, strip)."""
        return f"{self.triplet}-"

    @property
    def cross_compile(self) -> str:
        """CROSS_COMPILE= of ``kmodtest kernel build`` ('' = native)."""
        return self.tool_prefix if self.cross else ""

    def gcc_package(self, major: str = "") -> str:
        """Debian's gcc for the triplet (``gcc-aarch64-linux-gnu``), or one version of it
        (``gcc-14-aarch64-linux-gnu``); package names spell the triplet's '_' as '-'."""
        version = f"{major}-" if major else ""
        return f"gcc-{version}{self.triplet.replace('_', '-')}"


@dataclass(frozen=True)
class Arch:
    name: str  # kmodtest's name, used in cell ids and --arch
    debian: str  # dpkg architecture
    qemu_binary: str
    qemu_package: str  # Debian package providing qemu_binary (for fix hints and .ci/run)
    machine: str
    cpu: str
    console: str  # guest console device for console=
    kbuild: KernelBuild
    uname: tuple[str, ...]  # ``uname -m`` of hosts of this arch (native builds, no emulation)
    kvm_hosts: tuple[str, ...]  # ``uname -m`` of hosts that can run it under KVM
    kvm_cpu_flags: tuple[str, ...] = ()  # /proc/cpuinfo flags, one of which KVM needs
    kvm_probe: KvmProbe | None = None
    kernel_glob: tuple[str, ...] = DEBIAN_KERNEL_GLOB
    libvirt_arch: str = ""  # <type arch=...> in libvirt domain XML
    # the CPU model a libvirt domain gets where ``cpu`` has no libvirt form ("" : ``cpu`` has one)
    libvirt_cpu: str = ""
    # the guest gets ACPI tables (QEMU's default on x86; libvirt needs <acpi/> for the guest
    # to power off, and refuses it on arm without UEFI)
    acpi: bool = False
    # kernel command-line arguments the arch's QEMU machine boots faster with (Debian and
    # self-built kernels booted directly; measured in README "Benchmarks")
    cmdline: str = ""
    # emulated CPUs per VM (-smp): under TCG each is a host thread (multi-threaded TCG), so
    # this is also how many host cores one VM can use; measured in README "Benchmarks"
    smp: int = 1
    extra_args: tuple[str, ...] = field(default=())


def _x86_exit_bios(code: int) -> bytes:
    """64 KiB BIOS whose reset vector writes ``code`` to isa-debug-exit (port 0xf4)."""
    image = bytearray(b"\xf4" * 0x10000)  # hlt everywhere
    image[0xFFF0:0xFFF6] = bytes([0xB0, code, 0xE6, 0xF4, 0xF4, 0xF4])  # mov al,code; out 0xf4,al
    return bytes(image)


def _lines(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# QEMU's arm "virt" machine (both arm arches): a PL011 serial console, a generic PCI host bridge
_ARM_VIRT = {"qemu_package": "qemu-system-arm", "machine": "virt", "console": "ttyAMA0"}
_ARM_VIRT_KCONFIG = (
    "CONFIG_SERIAL_AMBA_PL011=y CONFIG_SERIAL_AMBA_PL011_CONSOLE=y CONFIG_PCI_HOST_GENERIC=y"
)

ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            name="x86_64",
            debian="amd64",
            qemu_binary="qemu-system-x86_64",
            qemu_package="qemu-system-x86",
            machine="pc",
            cpu="max",
            console="ttyS0",
            # the guest ignores the firmware's ACPI tables and finds CPUs and interrupt routing
            # in the MP table: boot to first command 3.98 s against 4.46 s under TCG, every NIC
            # model still works (QEMU still builds the tables, which libvirt's <acpi/> wants)
            cmdline="acpi=off",
            kbuild=KernelBuild(
                karch="x86",
                triplet="x86_64-linux-gnu",
                image="bzImage",
                kconfig=_lines("""
                    CONFIG_64BIT=y CONFIG_SERIAL_8250=y CONFIG_SERIAL_8250_CONSOLE=y
                    CONFIG_HYPERVISOR_GUEST=y CONFIG_PARAVIRT=y CONFIG_KVM_GUEST=y CONFIG_ACPI=y
                    CONFIG_X86_MPPARSE=y
                """),
            ),
            uname=("x86_64",),
            libvirt_arch="x86_64",
            acpi=True,
            kvm_hosts=("x86_64",),
            kvm_cpu_flags=("vmx", "svm"),
            # QEMU exits with (code << 1) | 1 when the guest writes code to isa-debug-exit
            kvm_probe=KvmProbe(
                "pc", _x86_exit_bios(0x31), ("isa-debug-exit,iobase=0xf4,iosize=0x04",), 0x63
            ),
        ),
        Arch(
            name="arm64",
            debian="arm64",
            qemu_binary="qemu-system-aarch64",
            **_ARM_VIRT,
            # pointer authentication (QARMA) emulated in TCG triples boot and command time;
            # without it, max keeps the newest ISA (LSE atomics, ...) at cortex-a57's speed
            cpu="max,pauth=off",
            kbuild=KernelBuild(
                karch="arm64",
                triplet="aarch64-linux-gnu",
                cross=True,
                image="Image",
                kconfig=_lines(f"{_ARM_VIRT_KCONFIG} CONFIG_ARM_GIC_V3=y"),
            ),
            uname=("aarch64",),
            libvirt_arch="aarch64",
            # libvirt 9.0 knows no aarch64 CPU features ("unknown CPU feature: pauth"), so
            # max,pauth=off cannot be said; cortex-a76 (ARMv8.2: LSE atomics, no pauth) is the
            # named model nearest to it in ISA and TCG speed
            libvirt_cpu="cortex-a76",
            kvm_hosts=("aarch64",),
        ),
        Arch(
            name="armhf",
            debian="armhf",
            qemu_binary="qemu-system-arm",
            **_ARM_VIRT,
            cpu="cortex-a15",
            kbuild=KernelBuild(
                karch="arm",
                triplet="arm-linux-gnueabihf",
                cross=True,
                image="zImage",
                kconfig=_lines(f"CONFIG_ARCH_VIRT=y CONFIG_ARM_LPAE=y {_ARM_VIRT_KCONFIG}"),
            ),
            uname=("armv7l", "armv8l"),
            libvirt_arch="armv7l",
            kvm_hosts=(),
        ),
    )
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise ConfigError(f"unknown arch {name!r}", f"use one of: {', '.join(ARCHES)}") from None


def host_arch() -> Arch | None:
    """The arch of the machine kmodtest runs on (None: one it has no record for)."""
    machine = os.uname().machine
    return next((a for a in ARCHES.values() if machine in a.uname), None)


def host_debian_arch() -> str:
    """The host's dpkg architecture, or its ``uname -m`` when no record matches."""
    host = host_arch()
    return host.debian if host else os.uname().machine
