"""What the cache holds, and what of it nothing points to any more (``kmodtest cache``).

Live means reachable from the current matrix: for each cell of ``kernels/*.yaml``, the index
entry of its input key and the image it names. Everything else in ``images/`` and ``index/``
is from an older recipe, package set or builder, and so are leftovers of interrupted builds
(``work/``, ``.<key>.*`` temporaries). The module-loop caches (``sources``, ``toolchains``,
``overlays``, ``kernel-trees``) and the Debian QEMU (``qemu``, :mod:`kmodtest.prepare.qemu`)
are listed with their size; ``--kind`` removes one wholesale, ``--unused-for DAYS`` what no
run has built or used for that long (mutation runs leave an overlay per mutant).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell, unbuilt_local_kernel
from kmodtest.prepare.images import ImageBuilder

NOT_ENTRIES = {"locks"}  # lock files are tiny and may be held by a running build


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # top-level directory: images, index, sources, ...
    path: Path
    size_bytes: int

    @property
    def temporary(self) -> bool:
        # partial/: downloads an interrupted run left for the next to resume
        return self.kind in ("work", "partial") or self.path.name.startswith(".")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walk
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def cache_entries(cache: Cache) -> list[CacheEntry]:
    entries = []
    if not cache.root.is_dir():
        return entries
    for kind_dir in sorted(p for p in cache.root.iterdir() if p.is_dir()):
        if kind_dir.name in NOT_ENTRIES:
            continue
        for path in sorted(kind_dir.iterdir()):
            entries.append(CacheEntry(kind_dir.name, path, _size(path)))
    return entries


def live_paths(cache: Cache, cells: Iterable[Cell], images_dir: Path) -> set[Path]:
    """Index entries and images the current matrix's cells point to."""
    builder = ImageBuilder(cache, images_dir)
    live: set[Path] = set()
    for cell in cells:
        if unbuilt_local_kernel(cell):  # nothing was built from a kernel that does not exist
            continue
        if cell.openwrt is not None:  # downloads and prepared OpenWrt images are keyed by content
            continue
        if found := builder.indexed(cell):
            live.update(found)
    return live


def stale_entries(cache: Cache, cells: Iterable[Cell], images_dir: Path) -> list[CacheEntry]:
    live = live_paths(cache, cells, images_dir)
    return [
        e
        for e in cache_entries(cache)
        if e.temporary or (e.kind in ("images", "index") and e.path not in live)
    ]


def unused_entries(cache: Cache, days: float, now: float | None = None) -> list[CacheEntry]:
    """Entries neither built nor served for ``days`` (their mtime: :func:`cache.mark_used`).

    Index entries are left: they are tiny, and one whose image went is rebuilt on demand.
    """
    cutoff = (time.time() if now is None else now) - days * 86400
    old = []
    for entry in cache_entries(cache):
        with contextlib.suppress(FileNotFoundError):  # removed while we look
            if entry.kind != "index" and entry.path.stat().st_mtime < cutoff:
                old.append(entry)
    return old


def remove(cache: Cache, entry: CacheEntry) -> bool:
    """Remove ``entry`` unless a running build holds its lock (then False: it is in use).

    Never waits: a build that holds the lock is filling or reading the entry right now.
    """
    with cache.try_lock(*cache.lock_of(entry.kind, entry.path.name)) as free:
        if not free:
            return False
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
        return True
