"""The exact kernel sources of a Debian kernel, cut down to what the module loop rebuilds.

Debian's ``linux-source-<x.y>`` package holds the tree with Debian's patches applied, as one
~150 MB ``.tar.xz``. A patch is applied to *these* sources (the ones the running kernel was
built from), never to upstream's, so the rebuilt modules differ from Debian's by the patch
only. Only ``net/netfilter/``, ``include/`` and the top Makefile are kept (~60 MB), once per
kernel version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kmodtest import processes
from kmodtest.errors import BuildError
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.keys import artifact_key
from kmodtest.prepare.toolchain import CHROOT_CODE, KernelPackages, fetch_packages
from kmodtest.progress import Progress

SOURCES_LAYOUT = 1
# what the module loop can rebuild; a patch touching anything else needs a full kernel build
KEPT = ("net/netfilter", "include", "Makefile")


@dataclass(frozen=True)
class KernelSources:
    root: Path  # holds net/netfilter/, include/, Makefile
    package: str
    version: str


def get_sources(cache: Cache, kernel: KernelPackages, progress: Progress) -> KernelSources:
    root = cached_source_paths(cache, "sources", kernel, KEPT, SOURCES_LAYOUT, progress)
    return KernelSources(root, kernel.source_package, kernel.version)


def cached_source_paths(
    cache: Cache,
    kind: str,
    kernel: KernelPackages,
    kept: Sequence[str],
    layout: int,
    progress: Progress,
) -> Path:
    """The ``kept`` paths of ``kernel``'s linux-source package, fetched and cut out once per
    version into the cache's ``kind`` (``layout``: bump when what is kept changes shape)."""
    pin = f"{kernel.source_package}={kernel.version}"
    inputs = {"layout": layout, "kept": list(kept), "package": pin, "suite": kernel.suite,
              "apt_options": list(kernel.apt_options)}  # fmt: skip
    key = artifact_key(inputs, (__name__, *CHROOT_CODE))

    def build(out: Path) -> None:
        with progress.step(f"{kind} of {pin} ({', '.join(kept)})"):
            start = time.monotonic()
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{kind}-") as tmp:
                # the package is arch: all; fetch it with the host's arch, no emulation needed
                tree = fetch_packages(kernel, [pin], Path(tmp), progress)
                tarball = source_tarball(tree.root, kernel.source_package)
                progress.detail(f"extracting {', '.join(kept)} from {tarball.name}")
                extract_source(tarball, out / "tree", kept)
            meta = {"package": kernel.source_package, "version": kernel.version,
                    "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
            (out / "sources.json").write_text(json.dumps(meta, indent=2) + "\n")

    return cache.get_or_build(kind, key, build) / "tree"


def source_tarball(root: Path, package: str) -> Path:
    """The ``linux-source-<x.y>.tar.*`` that Debian's linux-source ``package``, unpacked at
    ``root``, holds under ``usr/src``."""
    tarballs = sorted((root / "usr/src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise BuildError(
            f"{package} has no usr/src/linux-source-*.tar.*",
            "check the package contents; kmodtest expects Debian's layout",
        )
    return tarballs[0]


def extract_source(tarball: Path, dest: Path, kept: Sequence[str] = ()) -> None:
    """The tree's top directory into ``dest``: only the ``kept`` paths when given (``tar``
    still has to decompress everything, ~30 s), else all of it (~1.5 GB)."""
    tar = processes.require_tool("tar", "tar")
    dest.mkdir(parents=True)
    top = tarball.name.split(".tar")[0]  # linux-source-6.12
    wanted = [f"{top}/{p}" for p in kept]
    result = subprocess.run(
        [tar, "-xf", str(tarball), "-C", str(dest), "--strip-components=1", *wanted],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise BuildError(f"extracting {tarball.name} failed: {result.stderr.strip()[-500:]}")
