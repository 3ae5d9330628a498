"""A newer QEMU than the host's: Debian's QEMU packages of a newer suite, as a cache entry.

A host on an older distribution (Debian 12's QEMU 7.2) lacks NIC models (igb needs 8.0) and
has TCG faults that newer releases do not (README, "Which QEMU"). The packages of
:data:`QEMU_SUITE` and their dependencies (its glibc too) are unpacked with mmdebstrap, never
installed: each ``bin/qemu-system-*`` of the entry is a small script that runs that suite's
binary through that suite's dynamic loader and libraries, with its own firmware (``-L``) and
module directory, so nothing of the host's QEMU or libraries is mixed in.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kmodtest.arches import ARCHES, Arch, host_arch
from kmodtest.errors import BuildError
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.debian import fetch
from kmodtest.prepare.keys import artifact_key
from kmodtest.progress import Progress

QEMU_SUITE = "trixie"
# QEMU looks for a module its own tree lacks in the host's module directory too, and a host
# module of another build aborts it (``-device help`` loads every module): so the tree has
# all of them
QEMU_MODULE_PACKAGES = ("qemu-system-modules-opengl", "qemu-system-modules-spice")
# Bump when the entry's layout (wrapper scripts, qemu.json) changes.
QEMU_LAYOUT = 2
QEMU_CODE = ("kmodtest.prepare.qemu", "kmodtest.prepare.debian")
MANIFEST = "qemu.json"
INHERITED_ENV = "KMODTEST_DEBIAN_QEMU"  # the entry this process uses, for its children

_WRAPPER = """#!/bin/bash
# {binary} from Debian {suite} ({version}), unpacked by kmodtest (kmodtest/prepare/qemu.py):
# run with the suite's own loader, libraries, firmware and modules, not the host's; the
# process is still named {binary} (argv[0]), as tools that look for QEMU processes expect
root="$(dirname "$(readlink -f "$0")")/../root"
lib="$root/usr/lib/{triplet}"
export QEMU_MODULE_DIR="$lib/qemu"
exec -a {binary} "$lib/{loader}" --library-path "$lib" "$root/usr/bin/{binary}" \\
    -L "$root/usr/share/qemu" "$@"
"""


@dataclass(frozen=True)
class DebianQemu:
    """The unpacked suite's QEMU: ``bin_dir`` holds one runnable ``qemu-system-*`` per arch."""

    bin_dir: Path
    suite: str
    version: str  # the Debian package version of the QEMU binaries

    def binary(self, arch: Arch) -> Path:
        return self.bin_dir / arch.qemu_binary


def qemu_packages() -> list[str]:
    return sorted({a.qemu_package for a in ARCHES.values()} | set(QEMU_MODULE_PACKAGES))


def _key(host: Arch) -> str:
    inputs = {"layout": QEMU_LAYOUT, "kind": "qemu", "suite": QEMU_SUITE,
              "host": host.debian, "packages": qemu_packages()}  # fmt: skip
    return artifact_key(inputs, QEMU_CODE)


def get_debian_qemu(cache: Cache, progress: Progress) -> DebianQemu:
    """The cache entry with :data:`QEMU_SUITE`'s QEMU for every arch, unpacked once."""
    host = host_arch()
    if host is None:
        raise BuildError(
            f"no arch record for this host ({os.uname().machine}): kmodtest cannot unpack a "
            "QEMU for it",
            "use the host's QEMU: --qemu host",
        )

    def build(out: Path) -> None:
        with progress.step(f"QEMU from Debian {QEMU_SUITE} ({host.debian})"):
            tree = fetch(QEMU_SUITE, host.debian, qemu_packages(), out, progress)
            version = tree.versions.get("qemu-system-common") or tree.versions.get(
                ARCHES["x86_64"].qemu_package, "unknown"
            )
            loaders = sorted((tree.root / "usr/lib" / host.kbuild.triplet).glob("ld-linux*.so.*"))
            if not loaders:
                raise BuildError(
                    f"Debian {QEMU_SUITE}'s libc6 ({host.debian}) unpacked no dynamic loader "
                    f"under usr/lib/{host.kbuild.triplet}",
                    "use the host's QEMU: --qemu host",
                )
            bin_dir = out / "bin"
            bin_dir.mkdir()
            for binary in sorted({a.qemu_binary for a in ARCHES.values()}):
                script = bin_dir / binary
                script.write_text(
                    _WRAPPER.format(binary=binary, suite=QEMU_SUITE, version=version,
                                    triplet=host.kbuild.triplet, loader=loaders[0].name)
                )  # fmt: skip
                script.chmod(0o755)
                _check_runs(script)
            manifest = {"suite": QEMU_SUITE, "version": version, "packages": tree.versions}
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    key = _key(host)
    # an entry another cache already holds (a parent run's, handed down in the environment) is
    # the same content: reuse it instead of unpacking ~475 MB again into this cache
    inherited = Path(os.environ.get(INHERITED_ENV, "/nonexistent"))
    if inherited.name == key and (inherited / MANIFEST).is_file():
        entry = inherited
    else:
        entry = cache.get_or_build("qemu", key, build)
    os.environ[INHERITED_ENV] = str(entry)  # for child runs: inner pytest, validate, workers
    manifest = json.loads((entry / MANIFEST).read_text())
    return DebianQemu(entry / "bin", manifest["suite"], manifest["version"])


def _check_runs(script: Path) -> None:
    """Refuse a tree whose QEMU does not start (e.g. a library the loader cannot find)."""
    try:
        out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{script.name} from Debian {QEMU_SUITE} does not start: {exc}") from None
    if out.returncode != 0 or "QEMU emulator version" not in out.stdout:
        raise BuildError(
            f"{script.name} from Debian {QEMU_SUITE} does not start (exit {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[:300]}",
            "use the host's QEMU: --qemu host",
        )
