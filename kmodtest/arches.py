"""Each CPU architecture as a small record of data (like KUnit's ``qemu_configs/<arch>.py``).

Adding an architecture is adding a record here; nothing else switches on the arch name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kmodtest.errors import ConfigError


@dataclass(frozen=True)
class Arch:
    name: str  # kmodtest's name, used in cell ids and --arch
    debian: str  # dpkg architecture
    qemu_binary: str
    machine: str
    cpu: str
    console: str  # guest console device for console=
    kernel_glob: tuple[str, ...]  # where Debian's kernel packages put the image, tried in order
    host_machines: tuple[str, ...]  # ``uname -m`` values that can run it under KVM
    qemu_package: str  # Debian package providing qemu_binary (for fix hints and .ci/run)
    extra_args: tuple[str, ...] = field(default=())


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            name="x86_64",
            debian="amd64",
            qemu_binary="qemu-system-x86_64",
            machine="pc",
            cpu="max",
            console="ttyS0",
            kernel_glob=("boot/vmlinuz-*", "usr/lib/modules/*/vmlinuz"),
            host_machines=("x86_64",),
            qemu_package="qemu-system-x86",
        ),
        Arch(
            name="arm64",
            debian="arm64",
            qemu_binary="qemu-system-aarch64",
            machine="virt",
            # pointer authentication (QARMA) emulated in TCG triples boot and command time;
            # without it, max keeps the newest ISA (LSE atomics, ...) at cortex-a57's speed
            cpu="max,pauth=off",
            console="ttyAMA0",
            kernel_glob=("boot/vmlinuz-*", "usr/lib/modules/*/vmlinuz"),
            host_machines=("aarch64",),
            qemu_package="qemu-system-arm",
        ),
        Arch(
            name="armhf",
            debian="armhf",
            qemu_binary="qemu-system-arm",
            machine="virt",
            cpu="cortex-a15",
            console="ttyAMA0",
            kernel_glob=("boot/vmlinuz-*", "usr/lib/modules/*/vmlinuz"),
            host_machines=(),
            qemu_package="qemu-system-arm",
        ),
    )
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise ConfigError(f"unknown arch {name!r}", f"use one of: {', '.join(ARCHES)}") from None
