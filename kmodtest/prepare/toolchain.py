"""The suite's own compiler and the exact kernel's headers, as a cached chroot.

Out-of-tree modules must be built with the compiler and flags the kernel was built with
(``CONFIG_CC_VERSION_TEXT``, the headers' ``auto.conf``), or they fail to load or misbehave.
The host's gcc is the wrong one (bookworm's gcc-12 for trixie's gcc-14 kernel), so the build
runs in a chroot of the cell's suite: ``linux-headers-<version>`` (which pulls the matching
``linux-kbuild`` and compiler), make and the few tools kbuild calls. Unpacked with
mmdebstrap's ``extract`` variant like the images, and entered with ``unshare`` + ``chroot``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from kmodtest import processes
from kmodtest.errors import BuildError
from kmodtest.prepare import debian
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.keys import artifact_key
from kmodtest.progress import Progress

# Bump when the chroot's layout or package list changes in a way the key does not capture.
TOOLCHAIN_LAYOUT = 1
# kbuild's own needs besides what linux-headers depends on (make, a shell, coreutils ...)
BUILD_TOOLS = ("make", "dash", "coreutils", "sed", "grep", "mawk", "findutils", "diffutils")
NO_RECOMMENDS = 'APT::Install-Recommends "false"'
MOUNT_POINT = "/build"
# the code that makes a chroot (the key covers it: a change to it builds a new chroot)
CHROOT_CODE = ("kmodtest.prepare.toolchain", "kmodtest.prepare.debian")


@dataclass(frozen=True)
class KernelPackages:
    """What the module loop needs to know about a Debian kernel: from the image manifest."""

    suite: str
    debian_arch: str
    release: str  # uname -r, e.g. 6.12.118+deb13-amd64
    version: str  # Debian version of linux-image-<release>, e.g. 6.12.118-1
    apt_options: tuple[str, ...] = ()
    updates: bool = True

    @property
    def headers(self) -> str:
        return f"linux-headers-{self.release}"

    @property
    def source_package(self) -> str:
        """``linux-source-6.12`` for 6.12.118+deb13-amd64."""
        major_minor = ".".join(self.release.split(".")[:2])
        return f"linux-source-{major_minor}"

    def key_material(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "arch": self.debian_arch,
            "release": self.release,
            "version": self.version,
            "apt_options": list(self.apt_options),
            "updates": self.updates,
        }


def fetch_packages(
    kernel: KernelPackages, packages: list[str], workdir: Path, progress: Progress
) -> debian.FetchedTree:
    """``debian.fetch`` with the cell's apt options, and without recommends."""
    kwargs: dict[str, object] = {}
    if "updates" in inspect.signature(debian.fetch).parameters:
        kwargs["updates"] = kernel.updates
    return debian.fetch(
        kernel.suite,
        kernel.debian_arch,
        packages,
        workdir,
        progress,
        (*kernel.apt_options, NO_RECOMMENDS),
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Toolchain:
    """A chroot that can build modules for one kernel release."""

    root: Path
    release: str
    cc: str  # the compiler the kernel was built with, as kbuild's CC

    @property
    def headers_dir(self) -> str:
        return f"/usr/src/linux-headers-{self.release}"

    def run(
        self,
        argv: Sequence[str],
        bind: Path,
        log_path: Path,
        progress: Progress | None = None,
    ) -> int:
        """Run ``argv`` in the chroot with ``bind`` mounted at /build; output to ``log_path``."""
        return run_in_chroot(self.root, argv, bind, log_path, progress)


def run_in_chroot(
    root: Path,
    argv: Sequence[str],
    bind: Path,
    log_path: Path,
    progress: Progress | None = None,
    extra_binds: Sequence[tuple[Path, str]] = (),
) -> int:
    """A private mount namespace (so parallel builds never see each other's /build)."""
    unshare = processes.require_tool("unshare", "util-linux")
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    full = [unshare, "--mount", "--fork", "--kill-child", *userns,
            *chroot_argv(root, argv, bind, extra_binds)]  # fmt: skip
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(argv)}\n")
        log_file.flush()
        proc = processes.spawn(
            full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                log_file.write(line)
                if progress is not None:
                    progress.detail(escape(line.strip()[:100]))
            return proc.wait()
        finally:
            processes.terminate(proc)  # also on Ctrl-C: no make left writing into the workspace


# Every path is an argument of the script, never part of its text: a --source or --module-src
# path with spaces, quotes or $(...) in it stays one word and is never run.
_CHROOT_SCRIPT = (
    'set -e; r="$1"; b="$2"; n="$3"; shift 3; '
    'mount --rbind /dev "$r/dev"; mount --bind "$b" "$r/build"; '
    'while [ "$n" -gt 0 ]; do mkdir -p "$r$2"; mount --bind "$1" "$r$2"; shift 2; '
    "n=$((n - 1)); done; "
    'exec chroot "$r" env -i PATH=/usr/bin:/usr/sbin HOME=/tmp LANG=C.UTF-8 "$@"'
)


def chroot_argv(
    root: Path, argv: Sequence[str], bind: Path, extra_binds: Sequence[tuple[Path, str]] = ()
) -> list[str]:
    """``sh -c`` argv that bind-mounts ``bind`` at /build (and ``extra_binds``) into ``root``
    and runs ``argv`` chrooted there (inside the caller's private mount namespace)."""
    pairs = [str(x) for host, guest in extra_binds for x in (host, guest)]
    return ["sh", "-c", _CHROOT_SCRIPT, "sh", str(root), str(bind), str(len(extra_binds)),
            *pairs, *argv]  # fmt: skip


def _compiler(root: Path, release: str) -> str:
    auto = root / f"usr/src/linux-headers-{release}/include/config/auto.conf"
    try:
        text = auto.read_text()
    except FileNotFoundError:
        raise BuildError(
            f"no {auto} in the toolchain chroot",
            f"check that linux-headers-{release} exists in the suite (--refresh-images)",
        ) from None
    for line in text.splitlines():
        if line.startswith("CONFIG_CC_VERSION_TEXT="):
            cc = line.split("=", 1)[1].strip('"').split()[0]
            if (root / "usr/bin" / cc).exists():
                return cc
            raise BuildError(
                f"the kernel was built with {cc}, which the toolchain chroot lacks",
                "report it: linux-headers should depend on the kernel's compiler",
            )
    raise BuildError(f"{auto} has no CONFIG_CC_VERSION_TEXT", "is this a Debian kernel?")


def _finish_chroot(root: Path) -> None:
    """What maintainer scripts would have done (``extract`` runs none of them)."""
    awk = root / "usr/bin/awk"
    if not awk.exists() and (root / "usr/bin/mawk").exists():
        awk.symlink_to("mawk")
    sh = root / "usr/bin/sh"
    if not sh.exists() and not sh.is_symlink():
        sh.symlink_to("dash")
    for name in ("dev", "tmp", "proc", MOUNT_POINT.lstrip("/")):
        (root / name).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)


def get_toolchain(cache: Cache, kernel: KernelPackages, progress: Progress) -> Toolchain:
    """The cached chroot for ``kernel`` (built once, ~40 s and ~500 MB on first use)."""
    root = get_chroot(
        cache,
        kernel,
        [f"{kernel.headers}={kernel.version}", *BUILD_TOOLS],
        f"toolchain chroot for {kernel.release} ({kernel.suite})",
        progress,
    )
    return Toolchain(root, kernel.release, _compiler(root, kernel.release))


def get_chroot(
    cache: Cache, where: KernelPackages, packages: list[str], title: str, progress: Progress
) -> Path:
    """A cached chroot of ``packages`` (with dependencies) from ``where``'s suite and arch."""
    inputs = {"layout": TOOLCHAIN_LAYOUT, "packages": sorted(packages), **where.key_material()}
    key = artifact_key(inputs, CHROOT_CODE)

    def build(out: Path) -> None:
        with progress.step(title):
            start = time.monotonic()
            tree = fetch_packages(where, packages, out, progress)
            _finish_chroot(tree.root)
            meta = {"title": title, "packages": tree.versions,
                    "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
            (out / "toolchain.json").write_text(json.dumps(meta, indent=2) + "\n")
            for leftover in out.iterdir():
                if leftover.name not in ("root", "toolchain.json"):
                    _remove(leftover)

    return cache.get_or_build("toolchains", key, build) / "root"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
