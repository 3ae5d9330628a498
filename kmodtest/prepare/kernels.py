"""Kernel sources: where an image's kernel and modules come from.

Every kind answers the same three questions (which extra Debian packages to fetch, what
identifies its input, where the kernel file and modules tree are), so the image builder never
asks which kind it got. Debian packages and a user's own build exist today; OpenWrt releases and
patched-module overlays are further implementations of the same interface.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodtest.arches import Arch
from kmodtest.errors import BuildError, ConfigError
from kmodtest.prepare.cells import Cell, DebianSource, LocalSource

# What a Debian linux-image package installs besides the modules the closure picks: the kernel
# file itself (boot/, or usr/lib/modules/<ver>/vmlinuz since trixie's successors) and the
# device trees of arm boards (usr/lib/linux-image-<ver>/, ~30-60 MB: QEMU's virt machine makes
# its own). None of it belongs in the initramfs the kernel has to copy under emulation.
_DEBIAN_KERNEL_PATHS = ("boot", "usr/lib/modules", "usr/lib/linux-image-*")


@dataclass(frozen=True)
class KernelTree:
    image: Path  # bzImage / Image / zImage
    modules_root: Path  # holds lib/modules/<version>/
    version: str
    # globs (relative to the fetched package tree) that are the kernel's, not the userland's
    exclude: tuple[str, ...] = ("usr/lib/modules",)


class KernelSource(ABC):
    suite: str  # Debian suite for the userland packages around the kernel
    apt_options: tuple[str, ...] = ()
    updates: bool = True  # also fetch from <suite>-updates and <suite>-security

    @abstractmethod
    def extra_packages(self) -> tuple[str, ...]:
        """Debian packages to fetch together with the image's userland."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies this input, for the cache key."""

    @abstractmethod
    def locate(self, rootfs: Path, arch: Arch) -> KernelTree:
        """Find the kernel and modules (``rootfs`` holds the fetched packages)."""


def _single_version(modules_root: Path, where: str) -> str:
    base = modules_root / "lib" / "modules"
    versions = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if len(versions) != 1:
        raise BuildError(
            f"expected one kernel version under {base}, found {versions or 'none'}",
            f"check {where}",
        )
    return versions[0]


@dataclass(frozen=True)
class DebianKernel(KernelSource):
    suite: str
    kernel_package: str
    apt_options: tuple[str, ...] = ()
    updates: bool = True

    def extra_packages(self) -> tuple[str, ...]:
        return (self.kernel_package,)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "debian",
            "suite": self.suite,
            "package": self.kernel_package,
            "left_out": list(_DEBIAN_KERNEL_PATHS),  # changes the initramfs when it changes
            "updates": self.updates,
        }

    def locate(self, rootfs: Path, arch: Arch) -> KernelTree:
        version = _single_version(rootfs, f"the {self.kernel_package} package of {self.suite}")
        for pattern in arch.kernel_glob:
            for candidate in sorted(rootfs.glob(pattern)):
                if version in str(candidate):
                    return KernelTree(candidate, rootfs, version, _DEBIAN_KERNEL_PATHS)
        raise BuildError(
            f"{self.kernel_package} ({self.suite}) has no kernel image at {arch.kernel_glob}",
            "check the cell's kernel_package names a linux-image package for this arch",
        )


# depmod's output: the image builder rewrites it in the user's tree, so it must not change the key
_DEPMOD_FILES = re.compile(
    r"^modules\.(dep|alias|symbols|softdep|devname|weakdep|builtin\.alias|builtin\.bin)"
)


def _tree_digest(path: Path) -> str:
    """Cheap identity of a directory tree: names, sizes and mtimes."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not _DEPMOD_FILES.match(p.name):
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class LocalKernel(KernelSource):
    kernel_image: Path
    modules: Path
    suite: str = "trixie"

    def extra_packages(self) -> tuple[str, ...]:
        return ()

    def identity(self) -> dict[str, Any]:
        image = self.kernel_image.expanduser()
        if not image.is_file():
            raise ConfigError(
                f"kernel image {image} does not exist",
                "pass the bzImage/Image/zImage your build produced (arch/*/boot/)",
            )
        return {
            "kind": "local",
            "image": hashlib.sha256(image.read_bytes()).hexdigest(),
            "modules": _tree_digest(self.modules.expanduser()),
        }

    def locate(self, rootfs: Path, arch: Arch) -> KernelTree:
        root = self.modules.expanduser()
        version = _single_version(root, f"{root} (make modules_install INSTALL_MOD_PATH=...)")
        return KernelTree(self.kernel_image.expanduser(), root, version)


def kernel_source_for(cell: Cell) -> KernelSource:
    src = cell.spec.source
    if isinstance(src, DebianSource):
        return DebianKernel(src.suite, src.kernel_package, tuple(src.apt_options), src.updates)
    if isinstance(src, LocalSource):
        return LocalKernel(src.kernel_image, src.modules, src.suite)
    raise ConfigError(f"cell {cell.id}: unsupported kernel source {src!r}")
