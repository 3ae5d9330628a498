"""Which NIC models a QEMU binary offers: igb exists only since QEMU 8.0, for instance.

Asked of the binary itself (``-device help``) rather than inferred from its version, so
distribution builds that drop or backport a device are judged by what they really have.
"""

from __future__ import annotations

import functools
import re
import subprocess

DEVICE_NAME = re.compile(r'^name "([^"]+)"', re.MULTILINE)


@functools.cache
def qemu_devices(binary: str) -> frozenset[str]:
    """Device names ``binary`` accepts for ``-device`` (empty if it cannot be asked)."""
    try:
        out = subprocess.run(
            [binary, "-machine", "none", "-device", "help"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(DEVICE_NAME.findall(out.stdout))


@functools.cache
def qemu_version_line(binary: str) -> str:
    """``binary --version``'s first line ("QEMU emulator version 9.2.0 (Debian 1:9.2.0+ds-1)"):
    names the build exactly, so a saved state never loads into another QEMU."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.splitlines()[0].strip()


def qemu_version(binary: str) -> str:
    """The version number alone, for messages ("unknown version" when it cannot be asked)."""
    try:
        line = qemu_version_line(binary)
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown version"
    match = re.search(r"version (\S+)", line)
    return match.group(1) if match else "unknown version"


def missing_nic(binary: str, nic: str) -> str | None:
    """Why ``nic`` cannot run under ``binary``, or None when it can."""
    devices = qemu_devices(binary)
    if not devices or nic in devices:
        return None  # a binary that cannot be asked fails later, with QEMU's own message
    return f"{binary} {qemu_version(binary)} has no {nic} device (see `{binary} -device help`)"
