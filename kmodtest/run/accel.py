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

from kmodtest.arches import Arch, KvmProbe
from kmodtest.errors import ConfigError
from kmodtest.run.emulator import qemu_binary

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" | "tcg"
    reason: str


@functools.cache
def _kvm_probe(command: str, probe: KvmProbe) -> str | None:
    """None if a KVM guest ran the probe firmware to completion, else why not."""
    binary = shutil.which(command)
    if not binary:
        return f"{command} not installed"
    with tempfile.TemporaryDirectory(prefix="kmodtest-kvm-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        firmware.write_bytes(probe.firmware)
        argv = [
            binary, "-accel", "kvm", "-machine", probe.machine, "-cpu", "host", "-nodefaults",
            "-display", "none", "-no-reboot", "-bios", str(firmware),
        ]  # fmt: skip
        for device in probe.devices:
            argv += ["-device", device]
        try:
            result = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"a KVM probe VM did not finish in {PROBE_TIMEOUT:.0f} s"
    if result.returncode == probe.exit_status:
        return None
    err = result.stderr.decode(errors="replace").strip().splitlines()
    return f"a KVM probe VM failed (exit {result.returncode}: {err[-1] if err else 'no message'})"


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return flags


def kvm_unusable_reason(arch: Arch) -> str | None:
    host = platform.machine()
    if host not in arch.kvm_hosts:
        return f"guest arch {arch.name} differs from host {host}"
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (add yourself to the kvm group)"
    if arch.kvm_cpu_flags and not set(arch.kvm_cpu_flags) & _cpu_flags():
        wanted = " nor ".join(arch.kvm_cpu_flags)
        return f"the CPU advertises neither {wanted} (nested virtualisation is off)"
    if arch.kvm_probe is not None:
        return _kvm_probe(qemu_binary(arch), arch.kvm_probe)
    return None  # no probe for this arch: trust /dev/kvm; --accel tcg overrides


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
