"""What the user changed: a patch, or a source tree, turned into "these files, this content".

Both forms end as the same thing, the set of files under ``net/netfilter/`` and ``include/``
that differ from the kernel's own sources, so the overlay's cache key is the content of the
change, not the path or mtime of the file that carried it.
"""

from __future__ import annotations

import filecmp
import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.errors import ConfigError
from kmodtest.processes import require_tool

MODULE_DIR = "net/netfilter"
_PATCH_PATH = re.compile(r"^(?:\+\+\+|---) (?:[ab]/)?(\S+)")
# include/ paths a source tree may override (the rest of include/ comes from the headers)
SOURCE_TREE_INCLUDES = (
    "include/net/netfilter",
    "include/linux/netfilter",
    "include/uapi/linux/netfilter",
)


@dataclass(frozen=True)
class ModuleChange:
    """A patch file, a kernel source tree, or nothing (rebuild the Debian sources as they are)."""

    patch: Path | None = None
    source_tree: Path | None = None

    @property
    def label(self) -> str:
        if self.patch:
            return self.patch.name
        if self.source_tree:
            return str(self.source_tree)
        return "unpatched"

    def check(self) -> None:
        if self.patch and self.source_tree:
            raise ConfigError("give a patch or a source tree, not both")
        if self.patch and not self.patch.is_file():
            raise ConfigError(f"patch {self.patch} does not exist", "pass a `git diff` output")
        if self.source_tree and not (self.source_tree / MODULE_DIR).is_dir():
            raise ConfigError(
                f"{self.source_tree} has no {MODULE_DIR}/",
                "pass the top of a kernel source tree (the directory holding net/ and include/)",
            )


@dataclass
class Workspace:
    """Pristine module sources with the change applied, and what the change touched."""

    root: Path  # net/netfilter/ and the touched include/ files
    touched: dict[str, str] = field(default_factory=dict)  # path -> sha256 ('' = deleted)

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(sorted(self.touched.items())).encode()).hexdigest()

    def touched_in(self, prefix: str) -> list[str]:
        return sorted(p for p in self.touched if p.startswith(prefix + "/"))


def patch_paths(text: str) -> list[str]:
    paths = []
    for line in text.splitlines():
        if (m := _PATCH_PATH.match(line)) and m[1] != "/dev/null":
            paths.append(m[1])
    return sorted(set(paths))


def _check_paths(paths: list[str], origin: str) -> None:
    outside = [p for p in paths if not p.startswith((MODULE_DIR + "/", "include/"))]
    if outside:
        raise ConfigError(
            f"{origin} changes {', '.join(outside)}: the module loop rebuilds only "
            f"{MODULE_DIR}/ modules (with include/ headers)",
            "validate it with a full kernel build instead: --kernel-image PATH --modules PATH",
        )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def prepare(change: ModuleChange, sources: Path, dest: Path) -> Workspace:
    """Copy the pristine module sources to ``dest`` and apply ``change`` there."""
    change.check()
    shutil.copytree(sources / MODULE_DIR, dest / MODULE_DIR, symlinks=True)
    ws = Workspace(dest)
    if change.patch:
        text = change.patch.read_text(errors="replace")
        paths = patch_paths(text)
        if not paths:
            raise ConfigError(f"{change.patch} has no file changes", "pass a unified diff")
        _check_paths(paths, str(change.patch))
        for p in paths:
            if p.startswith("include/") and (sources / p).is_file():
                (dest / p).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(sources / p, dest / p)
        before = {p: _sha(dest / p) for p in paths}
        tool = require_tool("patch", "patch")
        result = subprocess.run(
            [tool, "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-i",
             str(change.patch.absolute())],
            cwd=dest, capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise ConfigError(
                f"{change.patch} does not apply to these kernel sources:\n"
                f"{(result.stdout + result.stderr).strip()[-1500:]}",
                "rebase the patch onto the cell's kernel version (see `kmodtest cells`)",
            )
        ws.touched = {p: _sha(dest / p) for p in paths if _sha(dest / p) != before[p]}
    elif change.source_tree:
        _copy_changed_tree(change.source_tree, sources, dest, ws)
    return ws


def _copy_changed_tree(tree: Path, sources: Path, dest: Path, ws: Workspace) -> None:
    """Every file of the user's tree (kept parts) that differs from the pristine one."""
    for top in (MODULE_DIR, *SOURCE_TREE_INCLUDES):
        base = tree / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            rel = str(path.relative_to(tree))
            if path.suffix not in (".c", ".h") and path.name not in ("Makefile", "Kconfig"):
                continue
            pristine = sources / rel
            if pristine.is_file() and filecmp.cmp(path, pristine, shallow=False):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            ws.touched[rel] = _sha(target)
