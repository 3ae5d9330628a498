"""The kernel's own network selftests, from the Debian ``linux-source-<x.y>`` of a cell's kernel.

``tools/testing/selftests/net/`` (its ``netfilter/`` scripts such as ``nft_flowtable.sh``, and
the ``lib.sh`` they source) of the exact version the cell boots, fetched with the same apt
machinery as the images and cached once per version, so an upstream test runs against the
kernel it was written for (``kmodtest run --put``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kmodtest.prepare.cache import Cache
from kmodtest.prepare.ksource import cached_source_paths
from kmodtest.prepare.toolchain import KernelPackages
from kmodtest.progress import Progress

SELFTESTS_LAYOUT = 1
KEPT = ("tools/testing/selftests/net",)


def get_selftests(cache: Cache, kernel: KernelPackages, progress: Progress) -> Path:
    """The cached ``tools/testing/selftests/net`` of ``kernel``'s linux-source package."""
    return (
        cached_source_paths(cache, "selftests", kernel, KEPT, SELFTESTS_LAYOUT, progress) / KEPT[0]
    )


def copy_selftests(source: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, symlinks=True)
