"""``kmodtest kernel build``: a minimal kernel for the suite, ready for ``--kernel-image``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from kmodtest.errors import ConfigError
from kmodtest.face import options
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.kernelbuild import (
    KernelSpec,
    build_kernel,
    cached_kernel,
    debian_source_tree,
    place,
    rebuild_modules,
)
from kmodtest.prepare.modchange import ModuleChange
from kmodtest.progress import Progress

console = Console()


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("kernel", help="build a minimal kernel for the suite")
    ksub = p.add_subparsers(dest="kernel_command", required=True)
    b = ksub.add_parser("build", help="tinyconfig + the suite's fragment, in a Debian chroot")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", type=Path, help="a clean Linux source tree")
    src.add_argument("--debian-source", metavar="SUITE", help="the suite's linux-source package")
    b.add_argument("--out", type=Path, required=True, help="output directory")
    b.add_argument("--arch", default="x86_64", help="x86_64 (tested), arm64, armhf")
    b.add_argument("--suite", default="trixie", help="Debian suite of the compiler (trixie)")
    b.add_argument(
        "--refresh", action="store_true", help="--debian-source: resolve the suite's version again"
    )
    b.add_argument("--jobs", type=int, default=None, help="make -j (default: min(2, cores))")
    b.add_argument(
        "--debug",
        action="store_true",
        help="add KASAN, lockdep, DEBUG_ATOMIC_SLEEP, DEBUG_NET, KMEMLEAK and DEBUG_LIST",
    )
    b.add_argument(
        "--module-patch",
        type=Path,
        default=None,
        help="--debian-source only: then rebuild the flowtable modules with this patch",
    )
    options.add_to_argparse(b, ["image_cache"])
    b.set_defaults(func=cmd_kernel_build)


def cmd_kernel_build(args: argparse.Namespace) -> int:
    cache = Cache(options.Settings.from_args(args).image_cache)
    progress = Progress()
    out = args.out.absolute()
    if args.debian_source:
        source = debian_source_tree(cache, args.debian_source, progress, args.refresh)
        spec = KernelSpec(source, args.arch, args.suite, args.debug)
        built = cached_kernel(cache, spec, progress, args.jobs)
        if args.module_patch:
            change = ModuleChange(patch=args.module_patch.absolute())
            rebuild_modules(cache, built, spec.arch, change, out / "modules", progress)
            result = place(built, out, out / "modules")
        else:
            result = place(built, out)
    else:
        if args.module_patch:
            raise ConfigError(
                "--module-patch needs --debian-source (a cached build keeps its build tree)",
                "apply the patch to your tree and build it again",
            )
        source = args.source.absolute()
        if not source.is_dir():
            raise ConfigError(f"{source} does not exist", "pass a Linux source tree")
        spec = KernelSpec(source, args.arch, args.suite, args.debug)
        result = build_kernel(cache, spec, out, progress, args.jobs)
    for line in result.unmet:
        console.print(f"[yellow]config: fragment not honoured: {line}[/]", highlight=False)
    for step, seconds in result.seconds.items():
        console.print(f"  {step}: {seconds:.1f} s")
    console.print(
        f"kernel {result.release}: {result.image}\n"
        f"run: pytest vmtests/ --kernel-image {result.image} --modules {result.modules}"
        f" --arch {args.arch}",
        highlight=False,
    )
    return 0
