"""Bring your own tools: extra Debian packages and kernel modules as a cached layer over an image.

An upstream selftest or a reproducer needs what the router image leaves out (bash, ping,
more modules such as ``ip6_tunnel`` or ``xfrm``). They come from the same suite, through the same
apt machinery (:func:`kmodtest.prepare.debian.fetch`), as the base image; modules come from the
base kernel's own package at its exact version, with depmod's indexes regenerated over the base's
modules and the new ones. The layer is a cpio archive appended to the base initramfs (as the
module loop's overlays are), cached under ``layers/<key>`` with the key from
:func:`~kmodtest.prepare.keys.artifact_key` (base image + packages + modules + this code).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmodtest.errors import BuildError, ConfigError
from kmodtest.prepare import debian, modules
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import Image, write_cpio, write_layered
from kmodtest.prepare.kernels import kernel_source_for
from kmodtest.prepare.keys import artifact_key
from kmodtest.progress import Progress

TOOLS_LAYOUT = 1
TOOLS_CODE = tuple(f"kmodtest.prepare.{m}" for m in ("tools", "debian", "modules", "images"))
# left out of the layer: what a command line never reads, and the kernel package's own tree
# (only the closure of the wanted modules goes in)
DROP = ("boot", "usr/lib/modules", "lib/modules", "usr/share/doc", "usr/share/man",
        "usr/share/info", "usr/share/locale", "usr/share/lintian", "usr/share/bug",
        "usr/share/zsh", "usr/share/fish", "usr/share/bash-completion", "etc/kernel",
        "usr/share/initramfs-tools", "usr/lib/*/gconv")  # fmt: skip


NO_RECOMMENDS = 'APT::Install-Recommends "false"'
# an mmdebstrap extract hook ($1: the tree): the kernel package alone, without what it depends
# on (initramfs-tools, udev ...), unpacked under $1/kernel
_KERNEL_HOOK = (
    'set -e; export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"; mkdir -p "$1/.dl"; cd "$1/.dl"; '
    "apt-get -q -o APT::Sandbox::User=root download '{pin}'; "
    'for d in *.deb; do dpkg-deb -x "$d" "$1/kernel"; done; cd /; rm -rf "$1/.dl"'
)


@dataclass(frozen=True)
class Tools:
    """What a layer adds: Debian package names, and module names of the cell's kernel."""

    packages: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.packages or self.modules)

    def plus(self, other: Tools) -> Tools:
        return Tools(
            tuple(dict.fromkeys([*self.packages, *other.packages])),
            tuple(dict.fromkeys([*self.modules, *other.modules])),
        )

    @classmethod
    def of_cell(cls, cell: Cell) -> Tools:
        """The cell's own ``extra_packages:`` and ``extra_modules:``."""
        return cls(tuple(cell.spec.extra_packages), tuple(cell.spec.extra_modules))


def layer_key(base: Image, tools: Tools) -> str:
    inputs = {"layout": TOOLS_LAYOUT, "base": base.path.name,
              "packages": sorted(tools.packages), "modules": sorted(tools.modules)}  # fmt: skip
    return artifact_key(inputs, TOOLS_CODE)


def kernel_pin(cell: Cell, base: Image) -> str:
    """``linux-image-<release>=<version>``: the base image's kernel package, exactly."""
    release = base.kernel_version
    packages: dict[str, str] = base.manifest["packages"]
    name = f"linux-image-{release}"
    found = next((k for k in packages if k == name or k.startswith(f"{name}-")), None)
    if found is None:
        raise ConfigError(
            f"cell {cell.id}: extra modules need a Debian kernel package; {base.path.name} "
            f"has no {name}",
            "for a self-built kernel, build the modules into its --modules tree",
        )
    return f"{found}={packages[found]}"


@dataclass
class ToolsLayer:
    """(cell, base image) -> the image with ``tools`` (plus the cell's own) in it."""

    cache: Cache
    tools: Tools = field(default_factory=Tools)  # from the command line (--package, --module)
    progress: Progress = field(default_factory=lambda: Progress(quiet=True))

    def __call__(self, cell: Cell, base: Image) -> Image:
        tools = Tools.of_cell(cell).plus(self.tools)
        if not tools:
            return base
        key = layer_key(base, tools)
        return Image(
            self.cache.get_or_build("layers", key, lambda out: self._build(cell, base, tools, out))
        )

    def _build(self, cell: Cell, base: Image, tools: Tools, out: Path) -> None:
        source = kernel_source_for(cell)
        apt = (*source.apt_options, NO_RECOMMENDS)
        with self.cache.workdir(prefix=f"layer-{cell.id}.") as tmp:
            work = Path(tmp)
            (work / "packages").mkdir()
            with self.progress.step(f"{cell.id}: fetching {', '.join(tools.packages) or '-'}"):
                tree = debian.fetch(
                    source.suite, cell.arch.debian, list(tools.packages), work / "packages",
                    self.progress, apt, source.updates,
                )  # fmt: skip
            staging = work / "layer"
            shutil.copytree(tree.root, staging, symlinks=True, ignore=_dropped(tree.root))
            placed: list[str] = []
            if tools.modules:
                pin = kernel_pin(cell, base)
                (work / "kernel").mkdir()
                with self.progress.step(f"{cell.id}: modules {', '.join(tools.modules)} ({pin})"):
                    kernel = debian.fetch(
                        source.suite, cell.arch.debian, [], work / "kernel", self.progress, apt,
                        source.updates, hooks=(f"--extract-hook={_KERNEL_HOOK.format(pin=pin)}",),
                    ).root / "kernel"  # fmt: skip
                    if not (kernel / "lib").exists():
                        (kernel / "lib").symlink_to("usr/lib")
                    placed = self._modules(base, tools, kernel, staging)
            write_cpio(staging, work / "layer.cpio")
            write_layered(base, work / "layer.cpio", out)
        manifest: dict[str, Any] = dict(base.manifest)
        manifest.update(
            initrd_bytes=(out / "initrd.cpio").stat().st_size,
            modules=sorted({*base.manifest["modules"], *placed}),
            tools={"base_image": base.path.name, "packages": list(tools.packages),
                   "modules": list(tools.modules), "resolved": dict(sorted(tree.versions.items())),
                   "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )  # fmt: skip
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def _modules(self, base: Image, tools: Tools, root: Path, staging: Path) -> list[str]:
        """The wanted modules' closure, and indexes over them and every base module."""
        release = base.kernel_version
        kernel_root = root  # the package tree: usr/lib/modules/<release> (merged-usr)
        if not (root / "lib" / "modules" / release).exists():
            raise BuildError(f"the kernel package has no lib/modules/{release}",
                             "rebuild the base image: --refresh-images")  # fmt: skip
        modules.depmod(kernel_root, release)
        base_mods = list(base.manifest["modules"])
        found = modules.closure(kernel_root, release, list(tools.modules), base_mods)
        names = modules.install(found, kernel_root, staging, release)
        # the indexes cover every module; the base's own .ko files are in the base already
        for ko in (staging / "usr" / "lib" / "modules" / release).rglob("*.ko"):
            if ko.stem in base_mods:
                ko.unlink()
        return [n for n in names if n not in base_mods]


def _dropped(root: Path):  # type: ignore[no-untyped-def]
    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(root)
        return {n for n in names if any(fnmatch.fnmatchcase(str(rel / n), d) for d in DROP)}

    return ignore
