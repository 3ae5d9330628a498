"""The ``kmodtest`` command: list and export the matrix, build images, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from kmodtest import __version__
from kmodtest.errors import KmodtestError
from kmodtest.face import interactive, kernelcmd, mutate, options, repro, validate
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell, Matrix, load_matrix, unbuilt_local_kernel
from kmodtest.prepare.images import ImageBuilder
from kmodtest.prepare.openwrt import OpenWrtImages
from kmodtest.progress import Progress

console = Console()


def _cells_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
) -> argparse.ArgumentParser:
    """A subcommand over the cells its selectors pick (``--kernel``/``--arch``/``--nic``, the
    directories): it runs ``func``."""
    parser = sub.add_parser(name, help=help)
    options.add_to_argparse(parser, [*options.SELECTORS, *options.DIRS, "openwrt_mirror"])
    parser.set_defaults(func=func)
    return parser


def _select(args: argparse.Namespace, default_all: bool = True) -> tuple[Matrix, list[Cell]]:
    settings = options.Settings.from_args(args)
    matrix = load_matrix(settings.kernels_dir)
    kernel = settings.kernel or ("all" if default_all else None)
    return matrix, matrix.select(kernel, settings.arch, settings.nic)


def _builder(args: argparse.Namespace, quiet: bool = False) -> ImageBuilder:
    settings = options.Settings.from_args(args)
    return ImageBuilder(Cache(settings.image_cache), settings.images_dir, Progress(quiet=quiet))


def _openwrt(args: argparse.Namespace, quiet: bool = False) -> OpenWrtImages:
    settings = options.Settings.from_args(args)
    return OpenWrtImages(
        Cache(settings.image_cache),
        settings.images_dir,
        Progress(quiet=quiet),
        settings.openwrt_mirror,
    )


def _source_text(cell: Cell) -> str:
    if (ow := cell.openwrt) is not None:
        what = ow.version or "local build"
        return f"openwrt:{what} {ow.target} ({ow.boot_path})"
    return f"{cell.spec.source.kind}:{getattr(cell.spec.source, 'suite', '')}"


def cmd_cells(args: argparse.Namespace) -> int:
    _matrix, cells = _select(args)
    builder = _builder(args, quiet=True)
    openwrt = _openwrt(args, quiet=True)
    table = Table("cell", "arch", "source", "NICs", "default", "ci", "cached kernel")
    for cell in cells:
        if cell.openwrt is not None:
            ow_image = openwrt.cached(cell)
            kernel = ow_image.kernel_version if ow_image else f"- (kmodtest fetch {cell.id})"
        else:
            image = None if unbuilt_local_kernel(cell) else builder.cached(cell)
            kernel = image.kernel_version if image else "-"
        table.add_row(
            cell.id,
            cell.arch.name,
            _source_text(cell),
            ",".join(cell.spec.nics),
            "yes" if cell.spec.default else "",
            "yes" if cell.spec.ci else "",
            kernel,
        )
    console.print(table)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download, verify and prepare the images of OpenWrt cells ahead of time."""
    matrix = load_matrix(options.Settings.from_args(args).kernels_dir)
    cells = [matrix.get(c) for c in args.cells] if args.cells else list(matrix.cells)
    cells = [c for c in cells if c.openwrt is not None]
    if not cells:
        raise KmodtestError(
            "no OpenWrt cell selected", "name cells whose source is {kind: openwrt, ...}"
        )
    openwrt = _openwrt(args)
    for cell in cells:
        image = openwrt.fetch(cell)
        console.print(f"{cell.id}: {image.description}, kernel {image.kernel_version}")
        for role, info in image.manifest["sources"].items():
            console.print(
                f"  {role}: {info['file']} sha256 {info['sha256'][:16]}… "
                f"(verified against {info['sha256_from']})",
                highlight=False,
            )
        console.print(f"  {image.path}", highlight=False)
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    """The selected cells as JSON for a GitHub Actions ``matrix: ${{ fromJSON(...) }}``."""
    _matrix, cells = _select(args)
    cells = [c for c in cells if c.spec.workflow == args.workflow]
    if args.ci:
        cells = [c for c in cells if c.spec.ci]
    if args.exclude_default:
        cells = [c for c in cells if not c.spec.default]
    if args.openwrt != "all":  # ci: OpenWrt cells marked ci: true only; none: no OpenWrt cell
        cells = [c for c in cells if c.openwrt is None or (args.openwrt == "ci" and c.spec.ci)]
    if args.ids:
        print(",".join(c.id for c in cells))
        return 0
    include = [
        {
            "cell": c.id,
            "arch": c.arch.name,
            "qemu_package": c.arch.qemu_package,
            "nics": ",".join(c.spec.nics),
            "openwrt": "yes" if c.openwrt is not None else "no",  # fetch its image first
        }
        for c in cells
    ]
    print(json.dumps({"include": include}, separators=(",", ":")))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    _matrix, cells = _select(args, default_all=False)
    builder = _builder(args)
    for cell in cells:
        if cell.openwrt is not None:
            console.print(
                f"{cell.id}: OpenWrt images are fetched, not built: kmodtest fetch {cell.id}"
            )
            continue
        image = builder.get(cell, refresh=args.refresh)
        manifest = image.manifest
        console.print(
            f"{cell.id}: kernel {manifest['kernel_version']}, "
            f"{len(manifest['packages'])} packages, {len(manifest['modules'])} modules, "
            f"initrd {manifest['initrd_bytes'] / 1e6:.1f} MB\n  {image.path}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kmodtest.face.bench import run_bench

    _matrix, cells = _select(args, default_all=False)
    return run_bench(args, cells, _builder(args))


def cmd_bench_boot(args: argparse.Namespace) -> int:
    from kmodtest.face.benchboot import run_bench_boot

    _matrix, cells = _select(args, default_all=False)
    return run_bench_boot(args, cells, _builder(args))


def cmd_bench_matrix(args: argparse.Namespace) -> int:
    from kmodtest.face.benchmatrix import run_bench_matrix

    args.kernel = args.kernel or "all"
    _matrix, cells = _select(args)
    return run_bench_matrix(args, cells, _builder(args))


def _workers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of worker counts: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"worker counts start at 1: {text!r}")
    return values


def cmd_bench_offload(args: argparse.Namespace) -> int:
    from kmodtest.face.benchoffload import run_bench_offload

    _matrix, cells = _select(args, default_all=False)
    return run_bench_offload(args, cells, _builder(args))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if days < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days (e.g. 14)")
    return days


def cmd_cache(args: argparse.Namespace) -> int:
    from kmodtest.prepare import cacheinfo

    settings = options.Settings.from_args(args)
    cache = Cache(settings.image_cache)
    cells = load_matrix(settings.kernels_dir).cells
    entries = cacheinfo.cache_entries(cache)
    stale = cacheinfo.stale_entries(cache, cells, settings.images_dir)
    if args.action == "list":
        table = Table("kind", "entries", "size", "stale", "stale size", title=str(cache.root))
        for kind in sorted({e.kind for e in entries}):
            mine = [e for e in entries if e.kind == kind]
            old = [e for e in stale if e.kind == kind]
            table.add_row(kind, str(len(mine)), _mb(sum(e.size_bytes for e in mine)),
                          str(len(old)), _mb(sum(e.size_bytes for e in old)))  # fmt: skip
        Console().print(table)
        print(f"total {_mb(sum(e.size_bytes for e in entries))}; "
              f"`kmodtest cache prune` frees {_mb(sum(e.size_bytes for e in stale))}")  # fmt: skip
        return 0
    if args.all:
        doomed = entries
    elif args.kind:
        doomed = [e for e in entries if e.kind in args.kind.split(",")]
    else:
        doomed = stale
        if args.unused_for is not None:
            unused = cacheinfo.unused_entries(cache, args.unused_for)
            doomed += [e for e in unused if e not in stale]
    busy = []
    if not args.dry_run:
        busy = [e for e in doomed if not cacheinfo.remove(cache, e)]
        doomed = [e for e in doomed if e not in busy]
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(doomed)} entries, {_mb(sum(e.size_bytes for e in doomed))}")
    for entry in busy:
        print(f"kept {entry.path}: a running build holds it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmodtest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kmodtest {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what happens (image builds, boots); run/shell: stream the "
                        "guest console")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    _cells_command(sub, "cells", cmd_cells, "list the matrix cells")

    p = sub.add_parser("fetch", help="download, verify and prepare OpenWrt cells' images")
    p.add_argument("cells", nargs="*", help="cell ids (default: every OpenWrt cell)")
    options.add_to_argparse(p, [*options.DIRS, "openwrt_mirror"])
    p.set_defaults(func=cmd_fetch)

    p = _cells_command(
        sub, "matrix", cmd_matrix, "print the selected cells as GitHub Actions matrix JSON"
    )
    p.add_argument("--ci", action="store_true", help="only cells marked ci: true")
    p.add_argument("--workflow", choices=("vmtests", "nightly"), default="vmtests",
                   help="only cells whose `workflow:` is this (default: vmtests)")  # fmt: skip
    p.add_argument("--exclude-default", action="store_true", help="leave out the default cell")
    p.add_argument("--ids", action="store_true", help="print a comma-separated id list instead")
    p.add_argument(
        "--openwrt", choices=("all", "ci", "none"), default="all",
        help="OpenWrt cells: all, only those marked ci: true, or none (default: all)",
    )  # fmt: skip

    p = _cells_command(sub, "build", cmd_build, "build (or reuse) the images of the selected cells")
    p.add_argument("--refresh", action="store_true", help="re-resolve package versions")

    p = _cells_command(
        sub, "bench", cmd_bench, "measure build, boot, command round trip and reset times"
    )
    p.add_argument("--boots", type=int, default=3, help="boots to time (default: 3)")
    p.add_argument("--commands", type=int, default=100,
                   help="agent round trips to time (default: 100)")  # fmt: skip
    p.add_argument("--resets", type=int, default=20,
                   help="network resets between tests to time (default: 20)")  # fmt: skip
    p.add_argument("--no-cold", action="store_true", help="skip the cold image build")
    options.add_to_argparse(p, ["accel", "qemu", "backend", "libvirt_uri"])

    p = _cells_command(
        sub,
        "bench-boot",
        cmd_bench_boot,
        "boot to first command, cold and restored from a saved state, next to "
        "virtme-ng's on the same kernel (alternating, medians, ratios)",
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds of cold, restored, virtme-ng")
    options.add_to_argparse(p, ["accel", "qemu"])

    p = _cells_command(
        sub,
        "bench-matrix",
        cmd_bench_matrix,
        "run the suite on the selected cells serially and with -n N; compare wall time, "
        "outcomes and boot time per arch",
    )
    p.add_argument("--workers", type=_workers, default=[1, 2],
                   help="comma-separated pytest -n values, 1 = serial (default: 1,2)")  # fmt: skip
    p.add_argument("--out", default="bench-matrix", help="JUnit XML and logs go here")
    p.add_argument("--tests", nargs="+", default=["vmtests/"], help="what pytest runs")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="after --: passed to pytest as is")  # fmt: skip

    p = _cells_command(
        sub,
        "bench-offload",
        cmd_bench_offload,
        "TCP throughput and ping RTT under load, with and without the flowtable, per cell",
    )
    p.add_argument("--megabytes", type=int, default=32, help="size of the throughput transfer")
    p.add_argument("--pings", type=int, default=40, help="pings while the bulk transfer runs")
    options.add_to_argparse(p, ["accel", "qemu"])

    p = sub.add_parser("cache", help="what the cache holds; prune what nothing points to")
    p.add_argument("action", nargs="?", choices=("list", "prune"), default="list",
                   help="list (default): what the cache holds; prune: remove what nothing "
                   "points to")  # fmt: skip
    p.add_argument("--all", action="store_true", help="prune: empty the cache")
    p.add_argument("--kind", help="prune: remove these kinds wholesale (e.g. sources,overlays)")
    p.add_argument("--unused-for", type=_days, metavar="DAYS",
                   help="prune: also remove entries of any kind no run has built or used for "
                   "DAYS days (rebuilt when needed again)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    options.add_to_argparse(p, options.DIRS)
    p.set_defaults(func=cmd_cache)

    interactive.add_parsers(sub)
    repro.add_parser(sub)
    validate.add_parser(sub)
    mutate.add_parser(sub)
    kernelcmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.func(args))
    except KmodtestError as exc:
        Console(stderr=True).print(f"[red]kmodtest:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kmodtest matrix | head`: the reader left, so do we, quietly
        stdout_gone()
        return 141  # 128 + SIGPIPE, as a program the signal ended


def stdout_gone() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
