"""Which QEMU runs each arch: the host's, or a newer Debian suite's unpacked in the cache.

``--qemu auto`` (the default) takes the host's binary unless it is older than
:data:`MIN_HOST_QEMU` (then the Debian one; a host without QEMU gets the error that names
its package) (:mod:`kmodtest.prepare.qemu`); ``host`` and
``debian`` force one. The choice is made once per process before a VM starts
(:func:`choose_qemu`) and read wherever a binary is started or asked (:func:`qemu_binary`),
so the launchers, the accelerator probe, the NIC check and the saved-state key all see the
same QEMU. A process that made no choice (a unit test, a helper script) uses the host's.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from kmodtest.arches import Arch
from kmodtest.errors import ConfigError
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.qemu import get_debian_qemu
from kmodtest.progress import Progress
from kmodtest.run.devices import qemu_version

log = logging.getLogger(__name__)

QEMU_CHOICES = ("auto", "host", "debian")
# below it, auto takes the Debian QEMU: 7.2 has no igb, and under TCG its x86_64 guests (the
# 6.12 kernel) die of a corrupted EFLAGS now and then (README, "Which QEMU")
MIN_HOST_QEMU = (8, 0)


@dataclass(frozen=True)
class QemuChoice:
    arch: str
    binary: str  # the arch record's binary name this choice stands for
    command: str  # a name on PATH (the host's) or the Debian entry's script
    origin: str  # for the run's header: "host 8.2.2", "Debian trixie 1:10.0.13+ds-0+deb13u1"
    reason: str


_chosen: dict[str, QemuChoice] = {}


def qemu_binary(arch: Arch) -> str:
    """The QEMU command for ``arch`` in this process."""
    choice = _chosen.get(arch.name)
    # a record that names another binary (a test's, a user's variant) keeps its own
    return choice.command if choice and choice.binary == arch.qemu_binary else arch.qemu_binary


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def _host_problem(arch: Arch, version: str | None) -> str | None:
    """Why ``auto`` does not take the host's QEMU (``version``, None: not installed), or None."""
    if version is None:  # not replaced behind the user's back: the error names the package
        return None
    if _release(version) < MIN_HOST_QEMU:
        wanted = ".".join(map(str, MIN_HOST_QEMU))
        return f"the host's {arch.qemu_binary} is {version}, older than {wanted}"
    return None


def choose_qemu(
    arches: Iterable[Arch], requested: str, cache: Cache, progress: Progress
) -> list[QemuChoice]:
    """Decide the QEMU of each arch for this process (building the Debian entry if needed)."""
    if requested not in QEMU_CHOICES:
        raise ConfigError(f"unknown --qemu {requested!r}", f"use one of {', '.join(QEMU_CHOICES)}")
    choices = []
    for arch in {a.name: a for a in arches}.values():
        path = shutil.which(arch.qemu_binary)
        version = qemu_version(path) if path else None
        why = "requested with --qemu debian" if requested == "debian" else None
        if requested == "auto":
            why = _host_problem(arch, version)
        if why is None:
            origin = f"host {version}" if version else "host (not installed)"
            choice = QemuChoice(arch.name, arch.qemu_binary, arch.qemu_binary, origin,
                                f"--qemu {requested}")  # fmt: skip
        else:
            debian = get_debian_qemu(cache, progress)
            origin = f"Debian {debian.suite} {debian.version}"
            choice = QemuChoice(arch.name, arch.qemu_binary, str(debian.binary(arch)), origin, why)
        _chosen[arch.name] = choice
        log.info("QEMU for %s: %s (%s)", arch.name, choice.origin, choice.reason)
        choices.append(choice)
    return choices


def describe(choice: QemuChoice) -> str:
    """One line for a run's header."""
    if choice.command == choice.binary:  # the host's
        return f"QEMU ({choice.arch}): {choice.origin}"
    return f"QEMU ({choice.arch}): {choice.origin}, unpacked in the cache ({choice.reason})"
