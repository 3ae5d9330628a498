"""The kernel's own network selftests, from the Debian ``linux-source-<x.y>`` of a cell's kernel.

``tools/testing/selftests/net/`` (its ``netfilter/`` scripts such as ``nft_flowtable.sh``, and
the ``lib.sh`` they source) of the exact version the cell boots, fetched with the same apt
machinery as the images and cached once per version, so an upstream test runs against the
kernel it was written for (``kmodtest run --put``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from kmodtest import processes
from kmodtest.errors import BuildError
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.keys import artifact_key
from kmodtest.prepare.toolchain import CHROOT_CODE, KernelPackages, fetch_packages
from kmodtest.progress import Progress

SELFTESTS_LAYOUT = 1
KEPT = ("tools/testing/selftests/net",)


def get_selftests(cache: Cache, kernel: KernelPackages, progress: Progress) -> Path:
    """The cached ``tools/testing/selftests/net`` of ``kernel``'s linux-source package."""
    pin = f"{kernel.source_package}={kernel.version}"
    inputs = {"layout": SELFTESTS_LAYOUT, "kept": KEPT, "package": pin, "suite": kernel.suite,
              "apt_options": list(kernel.apt_options)}  # fmt: skip
    key = artifact_key(inputs, (__name__, *CHROOT_CODE))

    def build(out: Path) -> None:
        with (
            progress.step(f"selftests from {pin}"),
            tempfile.TemporaryDirectory(dir=out.parent, prefix=".selftests-") as tmp,
        ):
            tree = fetch_packages(kernel, [pin], Path(tmp), progress)
            tarballs = sorted((tree.root / "usr/src").glob("linux-source-*.tar.*"))
            if not tarballs:
                raise BuildError(f"{kernel.source_package} has no usr/src/linux-source-*.tar.*")
            tar = processes.require_tool("tar", "tar")
            top = tarballs[0].name.split(".tar")[0]
            result = subprocess.run(
                    [tar, "-xf", str(tarballs[0]), "-C", str(out), "--strip-components=1",
                     *(f"{top}/{p}" for p in KEPT)],
                    capture_output=True, text=True,
                )  # fmt: skip
            if result.returncode != 0:
                raise BuildError(f"extracting {KEPT} failed: {result.stderr.strip()[-500:]}")

    return cache.get_or_build("selftests", key, build) / KEPT[0]


def copy_selftests(source: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, symlinks=True)
