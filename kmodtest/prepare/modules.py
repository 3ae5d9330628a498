"""Pick the kernel modules an image needs: the dependency closure of a few named modules.

Resolved on the host with kmod's own ``depmod`` and ``modprobe --show-depends``, so the answer
is the one the guest's modprobe would reach. Compressed modules (``.ko.xz``/``.ko.zst``) are
decompressed here: xz under TCG is slow.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.errors import BuildError
from kmodtest.processes import require_tool

_INSMOD = re.compile(r"^insmod (\S+)")
_BUILTIN = re.compile(r"^builtin (\S+)")


@dataclass
class ModuleSet:
    files: set[Path] = field(default_factory=set)  # absolute paths of .ko(.xz|.zst) files
    builtin: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)


def depmod(root: Path, version: str) -> None:
    tool = require_tool("depmod", "kmod")
    result = subprocess.run([tool, "-b", str(root), version], capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"depmod failed for {version}: {result.stderr.strip()}")


def closure(root: Path, version: str, wanted: list[str], optional: list[str]) -> ModuleSet:
    """Files needed to load ``wanted`` and ``optional`` modules; missing ``wanted`` is an error."""
    tool = require_tool("modprobe", "kmod")
    out = ModuleSet()
    for name in [*wanted, *optional]:
        result = subprocess.run(
            [tool, "-d", str(root), "-S", version, "--show-depends", "--ignore-install", name],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            if name in wanted:
                raise BuildError(
                    f"kernel {version} has no module {name!r}: {result.stderr.strip()}",
                    "drop it from the recipe's modules (or move it to optional_modules)",
                )
            out.missing.append(name)
            continue
        for line in result.stdout.splitlines():
            if m := _INSMOD.match(line):
                out.files.add(Path(m[1]))
            elif m := _BUILTIN.match(line):
                out.builtin.add(m[1])
    return out


def install(modules: ModuleSet, src_root: Path, dst_root: Path, version: str) -> list[str]:
    """Copy (decompressing) the set into ``dst_root/lib/modules/<version>``; run depmod there."""
    src_dir = src_root / "lib" / "modules" / version
    dst_dir = dst_root / "usr" / "lib" / "modules" / version
    dst_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(modules.files):
        rel = path.resolve().relative_to(src_dir.resolve())
        target = dst_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".xz":
            target = target.with_suffix("")
            target.write_bytes(lzma.decompress(path.read_bytes()))
        elif path.suffix == ".zst":
            target = target.with_suffix("")
            zstd = require_tool("zstd", "zstd")
            subprocess.run([zstd, "-q", "-d", "-f", str(path), "-o", str(target)], check=True)
        else:
            shutil.copy2(path, target)
        names.append(target.name.removesuffix(".ko"))
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (src_dir / meta).exists():
            shutil.copy2(src_dir / meta, dst_dir / meta)
    lib = dst_root / "lib"
    if not lib.exists():
        lib.symlink_to("usr/lib")
    depmod(dst_root, version)
    return sorted(names)
