"""Choose KVM only when it really works, else TCG, and say why.

``/dev/kvm`` existing is not enough: on a nested host without VMX/SVM, QEMU with KVM hangs or
aborts ("failed to set MSR 0x10a"). So: the guest arch must match the host, ``/dev/kvm`` must be
usable, the CPU must advertise virtualisation, and a bounded probe VM must run one instruction
stream to completion under KVM.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kmodtest.arches import Arch
from kmodtest.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" | "tcg"
    reason: str


def _x86_probe_bios() -> bytes:
    """64 KiB BIOS whose reset vector writes 0x31 to isa-debug-exit: QEMU exits with 99."""
    image = bytearray(b"\xf4" * 0x10000)  # hlt everywhere
    image[0xFFF0:0xFFF6] = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xF4])  # mov al,0x31; out 0xf4,al
    return bytes(image)


@functools.cache
def _kvm_probe(qemu_binary: str) -> str | None:
    """None if a KVM guest ran to completion, else why not."""
    binary = shutil.which(qemu_binary)
    if not binary:
        return f"{qemu_binary} not installed"
    with tempfile.TemporaryDirectory(prefix="kmodtest-kvm-") as tmp:
        bios = Path(tmp) / "probe.bin"
        bios.write_bytes(_x86_probe_bios())
        argv = [
            binary, "-accel", "kvm", "-machine", "pc", "-cpu", "host", "-nodefaults",
            "-display", "none", "-no-reboot", "-bios", str(bios),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
        try:
            result = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"a KVM probe VM did not finish in {PROBE_TIMEOUT:.0f} s"
    if result.returncode == (0x31 << 1) | 1:
        return None
    err = result.stderr.decode(errors="replace").strip().splitlines()
    return f"a KVM probe VM failed (exit {result.returncode}: {err[-1] if err else 'no message'})"


def kvm_unusable_reason(arch: Arch) -> str | None:
    host = platform.machine()
    if host not in arch.host_machines:
        return f"guest arch {arch.name} differs from host {host}"
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (add yourself to the kvm group)"
    if arch.name == "x86_64":
        flags = Path("/proc/cpuinfo").read_text()
        if " vmx" not in flags and " svm" not in flags:
            return "the CPU advertises neither vmx nor svm (nested virtualisation is off)"
        return _kvm_probe(arch.qemu_binary)
    return None  # non-x86 hosts: trust /dev/kvm; --accel tcg overrides


def choose_accel(arch: Arch, requested: str = "auto") -> AccelChoice:
    if requested not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"unknown accelerator {requested!r}", "use --accel auto, kvm or tcg")
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --accel tcg")
    reason = kvm_unusable_reason(arch)
    if requested == "kvm":
        if reason:
            log.warning("--accel kvm requested although %s", reason)
        return AccelChoice("kvm", "requested with --accel kvm")
    if reason:
        log.info("using TCG for %s: %s", arch.name, reason)
        return AccelChoice("tcg", reason)
    return AccelChoice("kvm", "KVM probe succeeded")
