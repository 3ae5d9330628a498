"""``kmodtest kernel build``: a minimal kernel for this suite from a Linux tree or Debian's sources.

``tinyconfig`` plus :mod:`kmodtest.prepare.kconfig`'s fragment, compiled in a chroot of a Debian
suite's toolchain (gcc, flex, bison, libelf ...; the host needs none of it), then
``modules_install`` into ``OUT/modules``. The result boots with
``pytest vmtests/ --kernel-image OUT/<image> --modules OUT/modules``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest import processes
from kmodtest.arches import get_arch, host_debian_arch
from kmodtest.errors import BuildError, ConfigError
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.kbuild import MAX_JOBS
from kmodtest.prepare.kconfig import fragment, unmet
from kmodtest.prepare.keys import artifact_key, read_index, write_index
from kmodtest.prepare.toolchain import KernelPackages, fetch_packages, get_chroot, run_in_chroot
from kmodtest.progress import Progress

KERNEL_TOOLS = (
    "gcc", "make", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "libc6-dev", "perl-base",
    "cpio", "kmod", "gzip", "xz-utils", "tar", "dash", "coreutils", "sed", "grep", "mawk",
    "findutils", "diffutils", "python3-minimal",
)  # fmt: skip
SRC = "/src"
# the code that fetches and unpacks a Debian kernel tree: its key covers it
TREE_CODE = (__name__, "kmodtest.prepare.toolchain", "kmodtest.prepare.debian")


@dataclass
class KernelBuild:
    image: Path
    modules: Path  # INSTALL_MOD_PATH
    release: str
    seconds: dict[str, float] = field(default_factory=dict)
    unmet: list[str] = field(default_factory=list)


def _suite_only(suite: str) -> KernelPackages:
    """Where to fetch build tools and sources from: the suite, for the host's arch."""
    return KernelPackages(suite, host_debian_arch(), "-", "-")


def tree_input_key(suite: str) -> str:
    """The inputs of a suite's kernel tree before its version is resolved, and its code."""
    return artifact_key({"suite": suite, **_suite_only(suite).key_material()}, TREE_CODE)


def debian_source_tree(cache: Cache, suite: str, progress: Progress, refresh: bool = False) -> Path:
    """The full tree of ``suite``'s ``linux-source`` (cached, ~1.5 GB unpacked).

    Keyed by the package version the suite resolved to; an index entry maps the suite to it,
    so later builds reuse the tree offline until ``refresh`` resolves the suite again.
    """
    where = _suite_only(suite)
    in_key = tree_input_key(suite)
    index = cache.path("kernel-trees", f"{in_key}.json")
    entry = read_index(index)
    if entry and not refresh and (cache.path("kernel-trees", entry["key"]) / "tree").is_dir():
        return cache.path("kernel-trees", entry["key"]) / "tree"
    work_parent = cache.root / "work"
    work_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"linux-source-{suite}.", dir=work_parent) as work:
        with progress.step(f"linux-source of {suite}"):
            tree = fetch_packages(where, ["linux-source"], Path(work), progress)
        versions = {k: v for k, v in tree.versions.items() if k.startswith("linux-source")}
        key = artifact_key({"input": in_key, "versions": versions}, ())

        def build(out: Path) -> None:
            tarballs = sorted((tree.root / "usr/src").glob("linux-source-*.tar.*"))
            if not tarballs:
                raise BuildError(f"linux-source of {suite} has no usr/src/linux-source-*.tar.*")
            tar = processes.require_tool("tar", "tar")
            (out / "tree").mkdir()
            with progress.step(f"unpacking {tarballs[0].name} (full tree)"):
                subprocess.run([tar, "-xf", str(tarballs[0]), "-C", str(out / "tree"),
                                "--strip-components=1"], check=True)  # fmt: skip
            (out / "sources.json").write_text(json.dumps({"suite": suite, **versions}) + "\n")

        path = cache.get_or_build("kernel-trees", key, build)
    write_index(index, {"key": key, "suite": suite, "resolved_at": time.time()})
    return path / "tree"


def build_kernel(
    cache: Cache,
    source: Path,
    out: Path,
    arch: str,
    suite: str,
    progress: Progress,
    jobs: int | None = None,
) -> KernelBuild:
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
    tools = [*KERNEL_TOOLS, *([k.cross_package] if k.cross_package else [])]
    chroot = get_chroot(
        cache, _suite_only(suite), tools,
        f"kernel build chroot ({suite})", progress,
    )  # fmt: skip
    timings["toolchain chroot"] = time.monotonic() - start
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "obj"
    obj.mkdir(exist_ok=True)
    log = out / "build.log"
    log.write_text("")
    make = ["make", "-C", SRC, "O=/build/obj", f"ARCH={k.karch}"]
    if k.cross:
        make.append(f"CROSS_COMPILE={k.cross}")
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

    frag = fragment(arch)
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
            "seconds": {n: round(s, 1) for n, s in timings.items()}, "unmet": missing}  # fmt: skip
    (out / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    return KernelBuild(image, modules, release, timings, missing)
