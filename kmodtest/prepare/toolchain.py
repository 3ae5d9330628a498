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
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rich.markup import escape

from kmodtest import processes
from kmodtest.arches import ARCHES, Arch, host_debian_arch
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
_GCC_MAJOR = re.compile(r"gcc-(\d+)$")
# dependencies of a target arch's linux-headers that are build-host tools (cross builds)
HOST_TOOLS_OF_HEADERS = ("pahole", "dwarves")
_HEADERS_DEPENDS = ".kmodtest-headers-depends"
# an mmdebstrap extract hook ($1: the tree): download linux-headers-<release> and its -common
# with the run's apt setup and unpack them as they are, recording the headers' Depends
_HEADERS_HOOK = (
    'set -e; export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"; '
    "common=$(apt-cache depends '{package}={version}' "
    "| sed -n 's/^ *Depends: \\(linux-headers-[^ ]*-common[^ ]*\\)$/\\1/p' | head -n 1); "
    'mkdir -p "$1/.dl"; cd "$1/.dl"; '
    "apt-get -q -o APT::Sandbox::User=root download '{package}={version}' \"$common={version}\"; "
    'for d in *.deb; do dpkg-deb -x "$d" "$1"; echo "$d" >> "$1/.kmodtest-debs"; done; '
    f'dpkg-deb -f {{package}}_*.deb Depends > "$1/{_HEADERS_DEPENDS}"; '
    'cd /; rm -rf "$1/.dl"'
)


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
    kernel: KernelPackages,
    packages: list[str],
    workdir: Path,
    progress: Progress,
    hooks: tuple[str, ...] = (),
) -> debian.FetchedTree:
    """``debian.fetch`` with the cell's apt options, and without recommends."""
    kwargs: dict[str, object] = {"hooks": hooks} if hooks else {}
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
    """A chroot that can build modules for one kernel release (natively or cross)."""

    root: Path
    release: str
    cc: str  # the compiler the kernel was built with (or its cross twin), as kbuild's CC
    arch: Arch  # the kernel's arch
    # cross builds: the target arch's linux-headers (a tree holding usr/src/), bound over
    # the chroot's /usr/src; native builds have them installed in the chroot itself
    headers_tree: Path | None = None

    @property
    def headers_dir(self) -> str:
        return f"/usr/src/linux-headers-{self.release}"

    @property
    def cross(self) -> bool:
        return self.headers_tree is not None

    @property
    def make_vars(self) -> list[str]:
        """ARCH, CROSS_COMPILE and CC for every kbuild call (the same natively and cross)."""
        return [f"ARCH={self.arch.kbuild.karch}", f"CROSS_COMPILE={self.binutils_prefix}",
                f"CC={self.cc}"]  # fmt: skip

    @property
    def binutils_prefix(self) -> str:
        """Debian's unprefixed binutils (``ld``, ``strip``) are not always installed (sid's
        headers pull only ``binutils-x86-64-linux-gnu``): the prefixed ones always are."""
        return self.arch.kbuild.tool_prefix

    @property
    def strip(self) -> str:
        return f"{self.binutils_prefix}strip"

    def run(
        self,
        argv: Sequence[str],
        bind: Path,
        log_path: Path,
        progress: Progress | None = None,
    ) -> int:
        """Run ``argv`` in the chroot with ``bind`` mounted at /build; output to ``log_path``."""
        binds = [(self.headers_tree / "usr/src", "/usr/src")] if self.headers_tree else []
        return run_in_chroot(self.root, argv, bind, log_path, progress, binds)


def run_in_chroot(
    root: Path,
    argv: Sequence[str],
    bind: Path,
    log_path: Path,
    progress: Progress | None = None,
    extra_binds: Sequence[tuple[Path, str]] = (),
) -> int:
    """Private mount and PID namespaces, so parallel builds never see each other's /build.

    The chroot gets its own ``/proc`` (7.x's objtool reads its stack limit from it) and the
    host's ``/dev``; the PID namespace is what lets a non-root user mount that ``/proc``.
    """
    unshare = processes.require_tool("unshare", "util-linux")
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    full = [unshare, "--mount", "--pid", "--fork", "--kill-child", *userns,
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
    'mount --rbind /dev "$r/dev"; mount -t proc proc "$r/proc"; mount --bind "$b" "$r/build"; '
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


def _kernel_cc(headers: Path) -> str:
    """The first word of ``CONFIG_CC_VERSION_TEXT``: ``gcc-12``, ``x86_64-linux-gnu-gcc-16``."""
    auto = headers / "include/config/auto.conf"
    try:
        text = auto.read_text()
    except FileNotFoundError:
        raise BuildError(
            f"no {auto}",
            f"check that {headers.name} exists in the suite (--refresh-images)",
        ) from None
    for line in text.splitlines():
        if line.startswith("CONFIG_CC_VERSION_TEXT="):
            return line.split("=", 1)[1].strip('"').split()[0]
    raise BuildError(f"{auto} has no CONFIG_CC_VERSION_TEXT", "is this a Debian kernel?")


def _native_compiler(root: Path, release: str) -> str:
    cc = _kernel_cc(root / f"usr/src/linux-headers-{release}")
    if (root / "usr/bin" / cc).exists():
        return cc
    raise BuildError(
        f"the kernel was built with {cc}, which the toolchain chroot lacks",
        "report it: linux-headers should depend on the kernel's compiler",
    )


def _gcc_major(cc: str) -> str:
    if m := _GCC_MAJOR.search(cc):
        return m[1]
    raise BuildError(
        f"the kernel was built with {cc!r}, not a versioned gcc",
        "the module loop knows Debian's gcc-<major> compilers only (is this a clang kernel?)",
    )


def _finish_chroot(root: Path) -> None:
    """What maintainer scripts would have done (``extract`` runs none of them)."""
    awk = root / "usr/bin/awk"
    if not awk.exists() and (root / "usr/bin/mawk").exists():
        awk.symlink_to("mawk")
    sh = root / "usr/bin/sh"
    if not sh.exists() and not sh.is_symlink():
        sh.symlink_to("dash")
    for name in ("dev", "tmp", "proc", "usr/src", MOUNT_POINT.lstrip("/")):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)


def get_toolchain(cache: Cache, kernel: KernelPackages, progress: Progress) -> Toolchain:
    """The cached chroot for ``kernel`` (built once, ~40 s and ~500 MB on first use).

    On a host of the kernel's arch: a chroot of the cell's suite with ``linux-headers`` and
    its dependencies (the kernel's own gcc). Otherwise see :func:`get_cross_toolchain`.
    """
    arch = module_loop_arch(kernel.debian_arch)
    if kernel.debian_arch != host_debian_arch():
        return get_cross_toolchain(cache, kernel, progress)
    root = get_chroot(
        cache,
        kernel,
        [f"{kernel.headers}={kernel.version}", *BUILD_TOOLS],
        f"toolchain chroot for {kernel.release} ({kernel.suite})",
        progress,
    )
    return Toolchain(root, kernel.release, _native_compiler(root, kernel.release), arch)


def get_cross_toolchain(cache: Cache, kernel: KernelPackages, progress: Progress) -> Toolchain:
    """A host-arch chroot of the cell's suite that builds modules for another arch.

    Debian's cross gcc of the kernel's gcc version (``gcc-14-aarch64-linux-gnu``), the
    host-arch ``linux-kbuild`` of the kernel's exact version (kbuild's host programs, fixdep,
    modpost, genksyms, must run here) and the target's own ``linux-headers`` (its .config,
    Module.symvers and generated headers: vermagic and symbol CRCs come from them), unpacked
    without dependencies and bound over ``/usr/src`` at build time.
    """
    arch = module_loop_arch(kernel.debian_arch)
    headers = get_target_headers(cache, kernel, progress)
    src = headers / "usr/src"
    cc = _kernel_cc(src / f"linux-headers-{kernel.release}")
    major = _gcc_major(cc)
    meta = json.loads((headers.parent / "headers.json").read_text())
    host = replace(kernel, debian_arch=host_debian_arch())
    gcc_package = arch.kbuild.gcc_package(major)
    packages = [gcc_package, *meta["host_packages"], *BUILD_TOOLS]
    root = get_chroot(
        cache, host, packages,
        f"cross toolchain chroot for {kernel.release} ({kernel.suite}, gcc-{major})", progress,
    )  # fmt: skip
    cross_cc = f"{arch.kbuild.tool_prefix}gcc-{major}"
    if not (root / "usr/bin" / cross_cc).exists():
        raise BuildError(
            f"{gcc_package} installed no /usr/bin/{cross_cc}",
            "check the cross compiler package of this suite",
        )
    return Toolchain(root, kernel.release, cross_cc, arch, headers)


def module_loop_arch(debian_arch: str) -> Arch:
    """The arch record of a Debian arch, if the module loop knows its toolchain's names."""
    arch = next((a for a in ARCHES.values() if a.debian == debian_arch), None)
    if arch is None or not arch.kbuild.triplet:
        raise BuildError(
            f"the module loop knows no toolchain triplet for Debian arch {debian_arch!r}",
            "add kbuild.triplet to its record in kmodtest/arches.py",
        )
    return arch


def target_headers_key(kernel: KernelPackages) -> str:
    """Cache key of :func:`get_target_headers`: the exact package, and how it is unpacked."""
    inputs = {"layout": TOOLCHAIN_LAYOUT, "kind": "target-headers", **kernel.key_material()}
    return artifact_key(inputs, CHROOT_CODE)


def get_target_headers(cache: Cache, kernel: KernelPackages, progress: Progress) -> Path:
    """``linux-headers-<release>`` and its ``-common`` of the kernel's arch, without their
    dependencies (an unrunnable gcc and kernel image): a tree holding ``usr/src``."""
    pin = f"{kernel.headers}={kernel.version}"

    def build(out: Path) -> None:
        with progress.step(f"target headers {pin} ({kernel.debian_arch}, no dependencies)"):
            start = time.monotonic()
            hook = _HEADERS_HOOK.format(package=kernel.headers, version=kernel.version)
            tree = fetch_packages(kernel, [], out, progress, hooks=(f"--extract-hook={hook}",))
            src = tree.root / "usr/src"
            headers = src / f"linux-headers-{kernel.release}"
            if not (headers / "Makefile").is_file():
                raise BuildError(
                    f"{pin} ({kernel.debian_arch}) did not unpack {headers.name}/Makefile",
                    "check that the package exists for this arch in the suite",
                )
            depends = (tree.root / _HEADERS_DEPENDS).read_text()
            meta = {"package": pin, "arch": kernel.debian_arch, "versions": tree.versions,
                    "host_packages": headers_host_packages(depends, kernel.version),
                    "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
            (out / "headers.json").write_text(json.dumps(meta, indent=2) + "\n")
            for leftover in tree.root.iterdir():
                if leftover.name != "usr":
                    _remove(leftover)

    return cache.get_or_build("toolchains", target_headers_key(kernel), build) / "root"


def headers_host_packages(depends: str, version: str) -> list[str]:
    """What of the headers' dependencies must run on the build host: ``linux-kbuild-*``
    (pinned to the kernel's version) and the tools kbuild calls (pahole for module BTF)."""
    out = []
    for alternatives in depends.replace("\n", ",").split(","):
        name = alternatives.split("|")[0].split("(")[0].split(":")[0].strip()
        if name.startswith("linux-kbuild-"):
            out.append(f"{name}={version}")
        elif name in HOST_TOOLS_OF_HEADERS:
            out.append(name)
    if not any(p.startswith("linux-kbuild-") for p in out):
        raise BuildError(
            f"the target linux-headers depend on no linux-kbuild ({depends.strip()!r})",
            "is this a Debian kernel?",
        )
    return sorted(set(out))


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
