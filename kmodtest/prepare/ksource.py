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
    pin = f"{kernel.source_package}={kernel.version}"
    inputs = {"layout": SOURCES_LAYOUT, "kept": KEPT, "package": pin, "suite": kernel.suite,
              "apt_options": list(kernel.apt_options)}  # fmt: skip
    key = artifact_key(inputs, (__name__, *CHROOT_CODE))

    def build(out: Path) -> None:
        with progress.step(f"sources {pin} ({', '.join(KEPT)})"):
            start = time.monotonic()
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".src-") as tmp:
                # the package is arch: all; fetch it with the host's arch, no emulation needed
                tree = fetch_packages(kernel, [pin], Path(tmp), progress)
                tarballs = sorted((tree.root / "usr/src").glob("linux-source-*.tar.*"))
                if not tarballs:
                    raise BuildError(
                        f"{kernel.source_package} has no usr/src/linux-source-*.tar.*",
                        "check the package contents; the module loop expects Debian's layout",
                    )
                progress.detail(f"extracting {', '.join(KEPT)} from {tarballs[0].name}")
                _extract(tarballs[0], out / "tree")
            meta = {"package": kernel.source_package, "version": kernel.version,
                    "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
            (out / "sources.json").write_text(json.dumps(meta, indent=2) + "\n")

    path = cache.get_or_build("sources", key, build)
    return KernelSources(path / "tree", kernel.source_package, kernel.version)


def _extract(tarball: Path, dest: Path) -> None:
    """Only the kept paths: ``tar`` still has to decompress everything (~30 s, once)."""
    tar = processes.require_tool("tar", "tar")
    dest.mkdir(parents=True)
    top = tarball.name.split(".tar")[0]  # linux-source-6.12
    wanted = [f"{top}/{p}" for p in KEPT]
    result = subprocess.run(
        [tar, "-xf", str(tarball), "-C", str(dest), "--strip-components=1", *wanted],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise BuildError(f"extracting {tarball.name} failed: {result.stderr.strip()[-500:]}")
