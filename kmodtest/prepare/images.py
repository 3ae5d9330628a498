"""Build (or reuse) a router image: kernel file + initramfs + manifest, cached by content.

Lookup is two-level. ``index/<input key>.json`` maps the inputs (recipe, kernel source, arch,
guest files) to the image last resolved for them; ``images/<image key>/`` is keyed by those
inputs *plus the resolved package versions*, so a new Debian upload gives a new image while an
unchanged archive reuses the old one. ``--refresh-images`` re-resolves; otherwise an index
entry is trusted, which keeps test start-up offline and instant.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kmodtest import __version__, processes
from kmodtest.errors import BuildError
from kmodtest.nics import NICS
from kmodtest.prepare import debian, modules
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.kernels import KernelSource, KernelTree, kernel_source_for
from kmodtest.prepare.keys import artifact_key, read_index, write_index
from kmodtest.prepare.recipes import Recipe, load_recipe
from kmodtest.progress import Progress

log = logging.getLogger(__name__)

# Bump when the image layout changes in a way the inputs below do not capture.
LAYOUT_VERSION = 1
GUEST_FILES = ("init", "agent")


def kernel_series(version: str) -> tuple[int, int]:
    """(major, minor) of a kernel release, e.g. (6, 12): what per-kernel expectations key on."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class PublishedImage:
    """An image directory in the cache (built from Debian, or a prepared OpenWrt download):
    its ``manifest.json`` and the kernel release it boots."""

    path: Path

    @functools.cached_property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json``, read once: a published image never changes."""
        return json.loads((self.path / "manifest.json").read_text())

    @property
    def kernel_version(self) -> str:
        return str(self.manifest["kernel_version"])

    @property
    def kernel_series(self) -> tuple[int, int]:
        return kernel_series(self.kernel_version)


@dataclass(frozen=True)
class Image(PublishedImage):
    """A built image on disk."""

    @property
    def kernel(self) -> Path:
        return self.path / "kernel"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.cpio"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _guest_file(name: str) -> bytes:
    return resources.files("kmodtest.guest").joinpath("files", name).read_bytes()


# the code that turns packages into an image: a change to it must not reuse old images
BUILDER_CODE = tuple(
    f"kmodtest.prepare.{m}" for m in ("images", "debian", "modules", "kernels", "recipes")
)


def input_key(recipe: Recipe, source: KernelSource, cell: Cell) -> str:
    inputs = {
        "layout": LAYOUT_VERSION,
        "recipe": recipe.digest(),
        "modules": image_modules(recipe),
        "source": source.identity(),
        "arch": cell.arch.debian,
        "suite": source.suite,
        "apt_options": list(source.apt_options),
        "guest": {n: _sha256(_guest_file(n)) for n in GUEST_FILES},
    }
    return artifact_key(inputs, BUILDER_CODE)


def image_modules(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(required, optional) modules of an image: the recipe's, and every NIC model's driver."""
    required = [*recipe.spec.modules, *recipe.spec.boot_modules]
    required += [n.driver for n in NICS.values() if not n.optional]
    optional = [*recipe.spec.optional_modules, *(n.driver for n in NICS.values() if n.optional)]
    return required, optional


def image_key(in_key: str, versions: dict[str, str]) -> str:
    """The image's own key: its inputs and the package versions they resolved to."""
    return artifact_key({"input": in_key, "versions": sorted(versions.items())}, ())


class ImageBuilder:
    """Turns a cell into an :class:`Image`, building at most once per content key."""

    def __init__(self, cache: Cache, images_dir: Path, progress: Progress | None = None) -> None:
        self.cache = cache
        self.images_dir = images_dir
        self.progress = progress or Progress(quiet=True)

    def _index_path(self, in_key: str) -> Path:
        return self.cache.root / "index" / f"{in_key}.json"

    def indexed(self, cell: Cell) -> tuple[Path, Path] | None:
        """(index entry, image directory it names) for this cell's inputs, if indexed."""
        recipe = load_recipe(self.images_dir, cell.spec.image)
        index = self._index_path(input_key(recipe, kernel_source_for(cell), cell))
        entry = read_index(index)
        if entry is None:
            return None
        return index, self.cache.path("images", entry["image"])

    def cached(self, cell: Cell) -> Image | None:
        """The image the index points at for this cell, if it is on disk and intact (a
        damaged one is discarded: the caller builds it again)."""
        found = self.indexed(cell)
        if found is None or self.cache.entry("images", found[1].name) is None:
            return None
        return Image(found[1])

    def get(self, cell: Cell, refresh: bool = False) -> Image:
        """The cell's image, fetching and building it at most once however many processes ask.

        The package fetch runs under the input key's lock: a second worker (``-n 2``) or
        terminal waits for the first and then reuses its index entry instead of fetching too.
        """
        if not refresh and (image := self.cached(cell)):
            return image
        asked = time.time()
        recipe = load_recipe(self.images_dir, cell.spec.image)
        source = kernel_source_for(cell)
        in_key = input_key(recipe, source, cell)
        with self.cache.lock("index", in_key):
            if image := self._resolved(cell, since=None if not refresh else asked):
                return image  # built (or refreshed) by another process while we waited
            with self.cache.workdir(prefix=f"{cell.id}.") as work:
                with self.progress.step(f"{cell.id}: fetching Debian packages ({source.suite})"):
                    tree = debian.fetch(
                        source.suite,
                        cell.arch.debian,
                        [*recipe.spec.packages, *source.extra_packages()],
                        work,
                        self.progress,
                        source.apt_options,
                        source.updates,
                    )
                key = image_key(in_key, tree.versions)

                def build(out: Path) -> None:
                    with self.progress.step(f"{cell.id}: assembling image {key}"):
                        self._assemble(cell, recipe, source, tree, work, out)

                path = self.cache.get_or_build("images", key, build)
            write_index(
                self._index_path(in_key),
                {"image": key, "resolved_at": time.time(), "cell": cell.id},
            )
        return Image(path)

    def _resolved(self, cell: Cell, since: float | None) -> Image | None:
        """The indexed image, if there is one (resolved after ``since``, when given)."""
        image = self.cached(cell)
        if image is None or since is None:
            return image
        found = self.indexed(cell)
        entry = read_index(found[0]) if found else None
        return image if entry and entry.get("resolved_at", 0) >= since else None

    def _assemble(
        self,
        cell: Cell,
        recipe: Recipe,
        source: KernelSource,
        tree: debian.FetchedTree,
        work: Path,
        out: Path,
    ) -> None:
        kernel: KernelTree = source.locate(tree.root, cell.arch)
        self.progress.detail(f"resolving module closure for {kernel.version}")
        modules.depmod(kernel.modules_root, kernel.version)
        required, optional = image_modules(recipe)
        wanted = list(dict.fromkeys(required))
        optional = [m for m in dict.fromkeys(optional) if m not in wanted]
        mods = modules.closure(kernel.modules_root, kernel.version, wanted, optional)

        staging = work / "initramfs"
        self.progress.detail("staging initramfs tree")
        shutil.copytree(
            tree.root,
            staging,
            symlinks=True,
            ignore=_ignore_paths(tree.root, [*recipe.spec.drop, *kernel.exclude]),
        )
        included = modules.install(mods, kernel.modules_root, staging, kernel.version)
        self._add_guest_files(staging, recipe, mods.builtin)

        shutil.copy2(kernel.image, out / "kernel")
        self.progress.detail("writing initramfs archive")
        write_cpio(staging, out / "initrd.cpio")
        manifest = {
            "cell": cell.id,
            "arch": cell.arch.name,
            "recipe": recipe.name,
            "recipe_digest": recipe.digest(),
            "source": source.identity(),
            "kernel_version": kernel.version,
            "packages": dict(sorted(tree.versions.items())),
            "modules": included,
            "modules_builtin": sorted(mods.builtin),
            "modules_missing": mods.missing,
            "kernel_sha256": _sha256((out / "kernel").read_bytes()),
            "initrd_sha256": _sha256((out / "initrd.cpio").read_bytes()),
            "initrd_bytes": (out / "initrd.cpio").stat().st_size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kmodtest": __version__,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def _add_guest_files(self, staging: Path, recipe: Recipe, builtin: set[str]) -> None:
        init = staging / "init"
        init.write_bytes(_guest_file("init"))
        init.chmod(0o755)
        lib = staging / "usr" / "lib" / "kmodtest"
        lib.mkdir(parents=True, exist_ok=True)
        (lib / "agent").write_bytes(_guest_file("agent"))
        etc = staging / "etc" / "kmodtest"
        etc.mkdir(parents=True, exist_ok=True)
        # builtin ones need no modprobe (an exec of kmod costs ~50 ms under TCG)
        boot = [m for m in recipe.spec.boot_modules if m not in builtin]
        (etc / "boot-modules").write_text("".join(f"{m}\n" for m in boot))
        (etc / "prefer-real").write_text("\n".join(recipe.spec.prefer_real) + "\n")
        sh = staging / "usr" / "bin" / "sh"
        if not sh.exists() and not sh.is_symlink():
            sh.symlink_to("dash")  # dash's postinst would have made it
        for name in ("proc", "sys", "dev", "tmp", "run", "root", "var/run"):
            (staging / name).mkdir(parents=True, exist_ok=True)
        # programs that look up names need these even with no network services
        (staging / "etc" / "hosts").write_text("127.0.0.1 localhost router\n::1 localhost\n")
        (staging / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (staging / "etc" / "group").write_text("root:x:0:\n")


def _ignore_paths(root: Path, drop: list[str]):  # type: ignore[no-untyped-def]
    """A ``copytree`` ignore function for the recipe's ``drop`` globs (relative to ``root``)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(root)
        return {n for n in names if any(fnmatch.fnmatchcase(str(rel / n), d) for d in drop)}

    return ignore


def write_cpio(tree: Path, archive: Path, names: Sequence[str] | None = None) -> None:
    """An uncompressed newc archive owned by root: the guest kernel need not decompress it.
    It holds ``names`` (paths relative to ``tree``), or else all of ``tree``."""
    cpio = processes.require_tool("cpio", "cpio")
    if names is None:
        names = []
        for directory, dirs, files in os.walk(tree):  # does not follow symlinked directories
            rel = Path(directory).relative_to(tree)
            names += [str(rel / n) for n in [*dirs, *files]]
        names.sort()
    with open(archive, "wb") as out:
        result = subprocess.run(
            [cpio, "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
            input="\n".join(names).encode(),
            cwd=tree,
            stdout=out,
            stderr=subprocess.PIPE,
        )
    if result.returncode != 0:
        raise BuildError(f"cpio failed: {result.stderr.decode().strip()}")


def write_layered(base: Image, layer: Path, out: Path) -> None:
    """``out`` as ``base`` plus one cpio layer: ``initrd.cpio`` is the base's with ``layer``
    appended (the kernel unpacks concatenated archives in order, so the layer's files win; the
    base ends on a 512-byte cpio block), ``kernel`` is the base's (a hard link where it can)."""
    with open(out / "initrd.cpio", "wb") as handle:
        for part in (base.initrd, layer):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, handle, 1 << 20)
    try:
        os.link(base.kernel, out / "kernel")
    except OSError:
        shutil.copy2(base.kernel, out / "kernel")
