"""Each cell's image for this run: built or found once, layered once, and never retried.

Debian and local-kernel cells are built (:class:`ImageBuilder`); OpenWrt cells are downloaded
ahead of time by ``kmodtest fetch`` (:class:`OpenWrtImages`) and only looked up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.errors import KmodtestError
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.images import Image, ImageBuilder
from kmodtest.prepare.openwrt import OpenWrtImage, OpenWrtImages


def failed_before(exc: KmodtestError, what: str) -> KmodtestError:
    """The same error again, saying it is a repeat: a run fails fast, once per cause."""
    again = type(exc)(f"{exc.problem}\n(this {what} failed earlier in this run)", exc.fix)
    return again


@dataclass
class Images:
    builder: ImageBuilder
    refresh: bool = False  # re-resolve package versions (once per cell and run)
    # a layer over each base image (--module-patch): (cell, base image) -> layered image
    overlay: Callable[[Cell, Image], Image] | None = None
    openwrt: OpenWrtImages | None = None  # None: OpenWrt cells cannot run (tests, CLI helpers)
    # installed on OpenWrt routers after boot (--openwrt-package): their counterpart of overlay
    openwrt_packages: tuple[Path, ...] = ()
    endpoints: Cell | None = None  # whose image endpoints VMs boot (the matrix default cell)
    two_vm: bool = False  # --topology two-vm: Debian routers get an endpoints VM too
    # then extra packages and modules (a cell's extra_packages:, run --package): a layer too
    tools: Callable[[Cell, Image], Image] | None = None
    built: dict[str, Image] = field(default_factory=dict)
    failed: dict[str, KmodtestError] = field(default_factory=dict)

    def image(self, cell: Cell) -> Image:
        if cell.id in self.failed:
            raise failed_before(self.failed[cell.id], f"image of {cell.id}")
        if cell.id not in self.built:
            try:
                image = self.builder.get(cell, refresh=self.refresh)
                image = self.overlay(cell, image) if self.overlay else image
                self.built[cell.id] = self.tools(cell, image) if self.tools else image
            except KmodtestError as exc:
                self.failed[cell.id] = exc
                raise
        return self.built[cell.id]

    def openwrt_image(self, cell: Cell) -> OpenWrtImage:
        """An OpenWrt cell's prepared image: fetched and verified before the run (the plugin
        skips a cell whose files are not in the cache), so this never downloads."""
        if self.openwrt is None:
            raise KmodtestError(f"cell {cell.id}: this run has no OpenWrt image source")
        image = self.openwrt.cached(cell)
        if image is None:
            raise KmodtestError(
                f"cell {cell.id}: its OpenWrt image is not in the cache",
                f"kmodtest fetch {cell.id}",
            )
        return image

    def cached(self, cell: Cell) -> Image | OpenWrtImage | None:
        """The cell's image if the cache has it (nothing built or fetched), for reports."""
        if cell.openwrt is not None:
            return self.openwrt.cached(cell) if self.openwrt is not None else None
        return self.builder.cached(cell)
