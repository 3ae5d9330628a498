"""``kmodtest kernel build``: a minimal kernel for this suite from a Linux tree or Debian's sources.

``tinyconfig`` plus :mod:`kmodtest.prepare.kconfig`'s fragment (with ``--debug``, its checkers
too), compiled in a chroot of a Debian suite's toolchain (gcc, flex, bison, libelf ...; the
host needs none of it), then ``modules_install`` into ``OUT/modules``. The result boots with
``pytest vmtests/ --kernel-image OUT/<image> --modules OUT/modules``.

A build of Debian's ``linux-source`` is cached (``kernel-builds/<key>``, key: the tree, arch,
suite, fragment and the code that builds it) with its build tree minus the object files, so
the flowtable modules can be rebuilt against it with a patch in about a minute: the module
loop's own ``prepare`` and ``build_modules``, with the kept build tree as the headers.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kmodtest.arches import KernelBuild as ArchKbuild
from kmodtest.arches import get_arch, host_debian_arch
from kmodtest.errors import BuildError, ConfigError
from kmodtest.prepare import kbuild, modules
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.kbuild import MAX_JOBS
from kmodtest.prepare.kconfig import fragment, unmet
from kmodtest.prepare.keys import artifact_key, read_index, write_index
from kmodtest.prepare.ksource import extract_source, source_tarball
from kmodtest.prepare.modchange import ModuleChange, prepare
from kmodtest.prepare.toolchain import (
    KernelPackages,
    Toolchain,
    fetch_packages,
    get_chroot,
    run_in_chroot,
)
from kmodtest.progress import Progress

KERNEL_TOOLS = (
    "gcc", "make", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "libc6-dev", "perl-base",
    "cpio", "kmod", "gzip", "xz-utils", "tar", "dash", "coreutils", "sed", "grep", "mawk",
    "findutils", "diffutils", "python3-minimal",
)  # fmt: skip
SRC = "/src"
# the code that fetches and unpacks a Debian kernel tree: its key covers it
TREE_CODE = (
    __name__,
    "kmodtest.prepare.ksource",
    "kmodtest.prepare.toolchain",
    "kmodtest.prepare.debian",
)
OBJ = "/build/obj"  # where the build tree is in the chroot: kbuild records this path in it
# what modules_install wrote for depmod to read, not rewrite: without modules.builtin,
# modprobe cannot tell a built-in driver (virtio_pci in the debug kernel) from a missing one
DEPMOD_INPUTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
KERNEL_BUILD_LAYOUT = 1
# what external module builds do not need from a finished build tree (~90 % of its size)
_OBJ_WASTE = ("*.o", "*.ko", "*.a", "vmlinux", ".tmp_vmlinux*", "*.mod.c")


@dataclass
class KernelBuild:
    image: Path
    modules: Path  # INSTALL_MOD_PATH
    release: str
    seconds: dict[str, float] = field(default_factory=dict)
    unmet: list[str] = field(default_factory=list)
    debug: bool = False
    obj: Path | None = None  # the kept build tree (cached builds only)
    source: Path | None = None
    suite: str = "trixie"


@dataclass(frozen=True)
class KernelSpec:
    """What names a kernel build: the tree, the arch, the suite whose toolchain compiles it and
    whether the fragment's debug checkers are on (``jobs`` only changes how fast)."""

    source: Path
    arch: str
    suite: str
    debug: bool = False


def _suite_only(suite: str) -> KernelPackages:
    """Where to fetch build tools and sources from: the suite, for the host's arch."""
    return KernelPackages(suite, host_debian_arch(), "-", "-")


def tree_input_key(suite: str) -> str:
    """The inputs of a suite's kernel tree before its version is resolved, and its code."""
    return artifact_key({"suite": suite, **_suite_only(suite).key_material()}, TREE_CODE)


def cached_source_tree(cache: Cache, suite: str) -> Path | None:
    """The tree :func:`debian_source_tree` last unpacked for ``suite``, or None (never fetches)."""
    entry = read_index(cache.path("kernel-trees", f"{tree_input_key(suite)}.json"))
    tree = cache.path("kernel-trees", entry["key"]) / "tree" if entry else None
    return tree if tree is not None and tree.is_dir() else None


def debian_source_tree(cache: Cache, suite: str, progress: Progress, refresh: bool = False) -> Path:
    """The full tree of ``suite``'s ``linux-source`` (cached, ~1.5 GB unpacked).

    Keyed by the package version the suite resolved to; an index entry maps the suite to it,
    so later builds reuse the tree offline until ``refresh`` resolves the suite again.
    """
    where = _suite_only(suite)
    in_key = tree_input_key(suite)
    index = cache.path("kernel-trees", f"{in_key}.json")
    if not refresh and (found := cached_source_tree(cache, suite)):
        return found
    work_parent = cache.root / "work"
    work_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"linux-source-{suite}.", dir=work_parent) as work:
        with progress.step(f"linux-source of {suite}"):
            tree = fetch_packages(where, ["linux-source"], Path(work), progress)
        versions = {k: v for k, v in tree.versions.items() if k.startswith("linux-source")}
        key = artifact_key({"input": in_key, "versions": versions}, ())

        def build(out: Path) -> None:
            tarball = source_tarball(tree.root, f"linux-source of {suite}")
            with progress.step(f"unpacking {tarball.name} (full tree)"):
                extract_source(tarball, out / "tree")
            (out / "sources.json").write_text(json.dumps({"suite": suite, **versions}) + "\n")

        path = cache.get_or_build("kernel-trees", key, build)
    write_index(index, {"key": key, "suite": suite, "resolved_at": time.time()})
    return path / "tree"


def kernel_tools(k: ArchKbuild) -> list[str]:
    """The packages of the chroot that compiles a kernel for ``k`` (and later its modules):
    natively, or with the triplet's cross gcc."""
    return [*KERNEL_TOOLS, *([k.gcc_package()] if k.cross else [])]


def build_kernel(
    cache: Cache, spec: KernelSpec, out: Path, progress: Progress, jobs: int | None = None
) -> KernelBuild:
    source, arch, suite, debug = spec.source, spec.arch, spec.suite, spec.debug
    k = get_arch(arch).kbuild
    if not (source / "Makefile").is_file() or not (source / "Kconfig").is_file():
        raise ConfigError(f"{source} is not a Linux source tree", "pass the top of the tree")
    if (source / ".config").exists():
        raise ConfigError(
            f"{source} has a .config (an in-tree build); kbuild refuses O= builds from it",
            f"run `make -C {source} mrproper` first, or pass a clean tree",
        )
    jobs = jobs or min(MAX_JOBS, os.cpu_count() or 1)
    timings: dict[str, float] = {}
    start = time.monotonic()
    chroot = _chroot(cache, suite, kernel_tools(k), progress)
    timings["toolchain chroot"] = time.monotonic() - start
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "obj"
    obj.mkdir(exist_ok=True)
    log = out / "build.log"
    log.write_text("")
    make = ["make", "-C", SRC, "O=/build/obj", f"ARCH={k.karch}"]
    if k.cross:
        make.append(f"CROSS_COMPILE={k.cross_compile}")
    binds = [(source.absolute(), SRC)]

    def run(title: str, argv: list[str]) -> None:
        t0 = time.monotonic()
        with progress.step(f"kernel build: {title}"):
            rc = run_in_chroot(chroot, argv, out, log, progress, binds)
        timings[title] = time.monotonic() - t0
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise BuildError(f"kernel build step {title!r} failed (exit {rc}):\n{tail}",
                             f"full log: {log}")  # fmt: skip

    frag = fragment(arch, debug)
    (out / "kmodtest.config").write_text(frag)
    run("tinyconfig", [*make, "tinyconfig"])
    with open(obj / ".config", "a") as config:
        config.write(frag)
    run("olddefconfig", [*make, "olddefconfig"])
    missing = unmet(frag, (obj / ".config").read_text())
    run("compile", [*make, f"-j{jobs}", k.image, "modules"])
    modules = out / "modules"
    shutil.rmtree(modules, ignore_errors=True)
    install = ["INSTALL_MOD_PATH=/build/modules", "INSTALL_MOD_STRIP=1", "modules_install"]
    run("modules_install", [*make, *install])
    release = (obj / "include/config/kernel.release").read_text().strip()
    image = out / k.image
    shutil.copy2(obj / "arch" / k.karch / "boot" / k.image, image)
    meta = {"release": release, "arch": arch, "suite": suite, "source": str(source),
            "image": k.image, "debug": debug,
            "seconds": {n: round(s, 1) for n, s in timings.items()}, "unmet": missing}  # fmt: skip
    (out / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    return KernelBuild(image, modules, release, timings, missing, debug, obj, source, suite)


def _chroot(cache: Cache, suite: str, tools: Sequence[str], progress: Progress) -> Path:
    title = f"kernel build chroot ({suite})"
    return get_chroot(cache, _suite_only(suite), list(tools), title, progress)


def _tree_identity(source: Path) -> dict[str, str]:
    """What names a tree: its sources.json (a Debian tree: package versions), else its path."""
    meta = source.parent / "sources.json"
    return json.loads(meta.read_text()) if meta.is_file() else {"path": str(source.absolute())}


def _kernel_key(spec: KernelSpec) -> str:
    inputs = {"layout": KERNEL_BUILD_LAYOUT, "tree": _tree_identity(spec.source),
              "arch": spec.arch, "kbuild": asdict(get_arch(spec.arch).kbuild), "suite": spec.suite,
              "fragment": fragment(spec.arch, spec.debug), "tools": KERNEL_TOOLS,
              "trim": _OBJ_WASTE, "build_kernel": inspect.getsource(build_kernel)}  # fmt: skip
    # what the build reads (the fragment's text, the arch's kbuild record, build_kernel's code),
    # not whole modules: an unrelated edit to arches.py, nics.py or the rest of this module must
    # not throw away a debug kernel (its compile took 381 s here on 2 cores, 7 min in all)
    return artifact_key(inputs, ())


def cached_kernel(
    cache: Cache, spec: KernelSpec, progress: Progress, jobs: int | None = None
) -> KernelBuild:
    """``build_kernel`` once per (tree, arch, suite, fragment, code), with its build tree."""

    def build(out: Path) -> None:
        result = build_kernel(cache, spec, out, progress, jobs)
        with progress.step("kernel build: trimming the build tree for module builds"):
            for pattern in _OBJ_WASTE:
                for path in (out / "obj").rglob(pattern):
                    if path.is_file() or path.is_symlink():
                        path.unlink()
        (out / "obj" / ".kmodtest-trimmed").write_text(result.release + "\n")

    path = cache.get_or_build("kernel-builds", _kernel_key(spec), build)
    return _cached(path, spec)


def lookup_kernel(cache: Cache, spec: KernelSpec) -> KernelBuild | None:
    """The cached build :func:`cached_kernel` would return, or None (never builds)."""
    path = cache.path("kernel-builds", _kernel_key(spec))
    return _cached(path, spec) if (path / "kernel.json").is_file() else None


def _cached(path: Path, spec: KernelSpec) -> KernelBuild:
    meta = json.loads((path / "kernel.json").read_text())
    return KernelBuild(
        path / meta["image"], path / "modules", meta["release"], meta["seconds"], meta["unmet"],
        meta["debug"], path / "obj", spec.source, spec.suite,
    )  # fmt: skip


@dataclass(frozen=True)
class BuildTreeToolchain(Toolchain):
    """The module loop's toolchain for a kernel ``kmodtest kernel build`` compiled: the same
    chroot and compiler, the kept build tree as the headers, the source tree at /src."""

    source: Path = Path()
    obj: Path = Path()

    @property
    def headers_dir(self) -> str:
        return OBJ

    def run(
        self, argv: Sequence[str], bind: Path, log_path: Path, progress: Progress | None = None
    ) -> int:
        binds = [(self.source.absolute(), SRC), (self.obj.absolute(), OBJ)]
        return run_in_chroot(self.root, argv, bind, log_path, progress, binds)


def rebuild_modules(
    cache: Cache, kernel: KernelBuild, arch: str, change: ModuleChange, out: Path,
    progress: Progress,
) -> Path:  # fmt: skip
    """``kernel``'s modules tree (built for ``arch``) with the flowtable modules rebuilt with
    ``change``, in ``out`` (unchanged files are hard links into the cache); returns ``out``."""
    if kernel.obj is None or kernel.source is None:
        raise ConfigError("only a cached kernel build (--debian-source) keeps its build tree")
    record = get_arch(arch)
    k = record.kbuild
    root = _chroot(cache, kernel.suite, kernel_tools(k), progress)  # the one build_kernel used
    toolchain = BuildTreeToolchain(root, kernel.release, f"{k.cross_compile}gcc", record,
                                   source=kernel.source, obj=kernel.obj)  # fmt: skip
    work = cache.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="kernel-modules-") as tmp:
        ws = prepare(change, kernel.source, Path(tmp) / "ws")
        with progress.step(f"modules for {kernel.release} ({change.label})"):
            built = kbuild.build_modules(toolchain, ws, progress)
            strip = ["strip", "--strip-debug"]
            strip += [f"/build/{p.relative_to(ws.root)}" for p in built.modules.values()]
            if toolchain.run(strip, ws.root, built.log) != 0:
                raise BuildError("strip failed on the built modules", f"see {built.log}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(kernel.modules, out, copy_function=os.link)
        moddir = out / "lib" / "modules" / kernel.release
        existing = {p.stem: p for p in moddir.rglob("*.ko")}
        for name, ko in built.modules.items():
            target = existing.get(name) or moddir / "kernel" / "net" / "netfilter" / f"{name}.ko"
            target.unlink(missing_ok=True)  # a hard link into the cache: never write through it
            shutil.copyfile(ko, target)
        for index in moddir.glob("modules.*"):
            if index.name not in DEPMOD_INPUTS:
                index.unlink()  # hard links too: depmod writes them anew
        modules.depmod(out, kernel.release)
    return out


def place(kernel: KernelBuild, out: Path, modules_tree: Path | None = None) -> KernelBuild:
    """Put a cached build's image and modules (or ``modules_tree``) in ``out``, as hard links."""
    out.mkdir(parents=True, exist_ok=True)
    image = out / kernel.image.name
    image.unlink(missing_ok=True)
    os.link(kernel.image, image)
    mods = out / "modules"
    if modules_tree is None:
        shutil.rmtree(mods, ignore_errors=True)
        shutil.copytree(kernel.modules, mods, copy_function=os.link)
    elif modules_tree != mods:
        raise ValueError("rebuild the modules into OUT/modules")
    return KernelBuild(image, mods, kernel.release, kernel.seconds, kernel.unmet, kernel.debug,
                       kernel.obj, kernel.source, kernel.suite)  # fmt: skip
