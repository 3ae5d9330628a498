"""pytest options for validating a kernel change: a module patch, or a whole self-built kernel.

``--module-patch X.patch`` / ``--module-src DIR``: every selected cell's image gets a layer with
the flowtable modules rebuilt from the cell's own kernel sources plus the change.
``--kernel-image PATH --modules DIR``: an ad-hoc cell (arch from ``--arch``, default x86_64)
boots the user's kernel with the modules of its ``make modules_install`` tree.
When a test fails, modules that failed to load are named with the kernel's own log line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodtest.arches import get_arch
from kmodtest.errors import ConfigError
from kmodtest.guest.modload import load_failures
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell, CellSpec, LocalSource
from kmodtest.prepare.modchange import ModuleChange
from kmodtest.prepare.overlay import OverlayBuilder, cross_build_skip
from kmodtest.progress import Progress

LOAD_FAILURE_PROPERTY = "kmodtest_module_load_failure"
CELL_PROPERTY = "kmodtest_cell"  # on every VM test's reports, also under xdist
CASE_ARG = "vm_case"


def add_options(group: pytest.OptionGroup) -> None:
    group.addoption(
        "--module-patch",
        default=None,
        metavar="FILE",
        help="rebuild the flowtable modules (and what the patch touches under net/netfilter) "
        "with this patch, against each cell's own kernel sources, and boot with them",
    )
    group.addoption(
        "--module-src",
        default=None,
        metavar="DIR",
        help="like --module-patch, from a kernel source tree (its net/netfilter + headers)",
    )
    group.addoption(
        "--module-rebuild",
        action="store_true",
        help="rebuild the flowtable modules from the unchanged sources (the control run)",
    )
    group.addoption(
        "--kernel-image",
        default=None,
        metavar="PATH",
        help="boot this kernel (bzImage/Image/zImage) as an ad-hoc cell; needs --modules",
    )
    group.addoption(
        "--modules",
        default=None,
        metavar="DIR",
        help="the kernel's `make modules_install INSTALL_MOD_PATH=DIR` tree",
    )
    group.addoption(
        "--userland-suite",
        default="trixie",
        metavar="SUITE",
        help="Debian suite of the userland around --kernel-image (default: trixie)",
    )


def module_change(config: pytest.Config) -> ModuleChange | None:
    patch, src = config.getoption("module_patch"), config.getoption("module_src")
    if not (patch or src or config.getoption("module_rebuild")):
        return None
    change = ModuleChange(
        patch=Path(patch).absolute() if patch else None,
        source_tree=Path(src).absolute() if src else None,
    )
    change.check()
    return change


def overlay_builder(
    config: pytest.Config, cache: Cache, quiet: bool, log_dir: Path
) -> OverlayBuilder | None:
    """The module loop's layer builder; a failed build's logs go to ``log_dir``."""
    change = module_change(config)
    if change is None:
        return None
    if config.getoption("kernel_image"):
        raise ConfigError(
            "--module-patch/--module-src apply to Debian cells, not to --kernel-image",
            "patch and rebuild your own kernel tree instead",
        )
    return OverlayBuilder(cache, change, Progress(quiet=quiet), log_dir=log_dir)


def overlay_skips(cells: list[Cell], skips: dict[str, str]) -> dict[str, str]:
    """Cells a module overlay cannot be built for here, with the reason the skip shows."""
    out = {}
    for cell in cells:
        why = cross_build_skip(cell)
        if why and cell.id not in skips:
            out[cell.id] = why
    return out


def adhoc_cells(config: pytest.Config) -> list[Cell] | None:
    """The ``--kernel-image``/``--modules`` cell, or None when those options are absent."""
    image, mods = config.getoption("kernel_image"), config.getoption("modules")
    if not image and not mods:
        return None
    if not (image and mods):
        raise ConfigError(
            "--kernel-image and --modules go together",
            "pass the kernel file and the `make modules_install INSTALL_MOD_PATH=DIR` tree",
        )
    if config.getoption("kernel"):
        raise ConfigError(
            "--kernel selects matrix cells; it cannot be combined with --kernel-image",
            "drop --kernel (use --arch to pick the ad-hoc cell's arch)",
        )
    arch = get_arch((config.getoption("arch") or "x86_64").split(",")[0].strip())
    image_path, mods_path = Path(image).absolute(), Path(mods).absolute()
    if not image_path.is_file():
        raise ConfigError(f"--kernel-image {image_path} is not a file", "pass arch/*/boot/bzImage")
    if not (mods_path / "lib" / "modules").is_dir():
        raise ConfigError(
            f"--modules {mods_path} has no lib/modules/",
            "pass the INSTALL_MOD_PATH of `make modules_install`",
        )
    source = LocalSource(
        kind="local",
        kernel_image=image_path,
        modules=mods_path,
        suite=config.getoption("userland_suite"),
    )
    spec = CellSpec(
        id=f"local-{arch.debian}", arch=arch.name, source=source, nics=("virtio-net-pci", "e1000")
    )
    return [Cell(spec=spec, arch=arch, origin=image_path)]


class ModuleLoadReporter:
    """Names the modules that failed to load when a test fails (overlay and local kernels),
    and the cell of every VM test's report (what ``kmodtest validate`` counts per cell)."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Iterator[None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get(CASE_ARG) if callspec else None
        if case is not None:
            report.user_properties.append((CELL_PROPERTY, case.cell.id))
        vm = getattr(item, "funcargs", {}).get("router")
        if vm is None or not report.failed or report.when not in ("setup", "call"):
            return
        failures = load_failures(vm.console_log)
        if not failures:
            return
        text = "\n".join(str(f) for f in failures)
        report.user_properties.append((LOAD_FAILURE_PROPERTY, str(failures[0])))
        report.sections.append(("kmodtest module load failures", text))
