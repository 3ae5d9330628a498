"""Fetch Debian packages (with their dependencies) into a directory tree with mmdebstrap.

mmdebstrap's ``extract`` variant unpacks packages without running maintainer scripts, needs no
emulation for foreign arches, and uses its own apt setup and default mirror, so the host's
apt sources are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from kmodtest import processes
from kmodtest.errors import BuildError
from kmodtest.progress import Progress

_DEBS_LIST = ".kmodtest-debs"
# drops the -updates and -security lines mmdebstrap wrote, before its apt-get update
_NO_UPDATES_HOOK = (
    "--setup-hook=sed -i -e '/-updates /d' -e '/-security /d' \"$1\"/etc/apt/sources.list"
)


_DEB = re.compile(r"^(?P<name>[^_]+)_(?P<version>[^_]+)_(?P<arch>[^_]+)\.deb$")


@dataclass(frozen=True)
class FetchedTree:
    root: Path
    versions: dict[str, str]  # package -> version, every package that was unpacked


def fetch(
    suite: str,
    debian_arch: str,
    packages: list[str],
    workdir: Path,
    progress: Progress,
    apt_options: tuple[str, ...] = (),
    updates: bool = True,
    hooks: tuple[str, ...] = (),
) -> FetchedTree:
    """Unpack ``packages`` and all their dependencies for ``debian_arch`` into ``workdir/root``.

    ``hooks``: extra mmdebstrap hook options (e.g. ``--extract-hook=...``) for what
    ``--include`` cannot say, like unpacking a package without its dependencies.
    """
    mmdebstrap = processes.require_tool("mmdebstrap", "mmdebstrap")
    tarball = workdir / "packages.tar"
    argv = [
        mmdebstrap,
        "--variant=extract",
        f"--architectures={debian_arch}",
        *([f"--include={','.join(packages)}"] if packages else []),
        # (no archives directory when nothing was included)
        f'--extract-hook=ls "$1"/var/cache/apt/archives/ > "$1"/{_DEBS_LIST} 2>/dev/null || :',
        *hooks,
        *[f"--aptopt={opt}" for opt in apt_options],
        *([] if updates else [_NO_UPDATES_HOOK]),
        suite,
        str(tarball),
    ]
    log_path = workdir / "mmdebstrap.log"
    with open(log_path, "w") as log_file:
        proc = processes.spawn(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                log_file.write(line + "\n")
                progress.detail(f"mmdebstrap {suite}/{debian_arch}: {line[:100]}")
            rc = processes.wait(proc)
        finally:
            processes.terminate(proc)  # on an interrupt: mmdebstrap, apt and dpkg, all of them
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        log_path = keep_log(log_path, f"mmdebstrap-{suite}-{debian_arch}")
        raise BuildError(
            f"mmdebstrap failed for {suite}/{debian_arch} (exit {rc}):\n{tail}",
            "check the suite and package names in kernels/*.yaml and images/*.yaml; an expired "
            "Release file needs apt_options: ['Acquire::Check-Valid-Until \"false\"'] on the "
            f"cell. Full log: {log_path}",
        )
    root = workdir / "root"
    root.mkdir()
    progress.detail("unpacking package tree")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if not (m.isdev() or m.isfifo())]
        tar.extractall(root, members=members, filter="tar")
    tarball.unlink()
    versions: dict[str, str] = {}
    debs = root / _DEBS_LIST
    for name in debs.read_text().split():
        parsed = parse_deb_filename(name)
        if parsed:
            versions[parsed[0]] = parsed[1]
    debs.unlink()
    merge_usr(root)
    return FetchedTree(root, versions)


def keep_log(path: Path, label: str) -> Path:
    """Copy a failed step's log out of its work directory (which the caller removes) into a
    private file in the temp directory, so the error message can point at it."""
    fd, kept = tempfile.mkstemp(prefix=f"kmodtest-{label}-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        out.write(path.read_bytes())
    return Path(kept)


def merge_usr(root: Path) -> None:
    """Give the tree a merged /usr (``/bin -> usr/bin`` ...), whichever layout it was unpacked in.

    ``extract`` skips base-files' setup, so trixie trees lack the top-level symlinks and
    bookworm trees have real top-level directories; dynamic binaries need one layout.
    """
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top, usr = root / name, root / "usr" / name
        if top.is_symlink():
            continue
        if top.is_dir():
            usr.mkdir(parents=True, exist_ok=True)
            for entry in top.iterdir():
                target = usr / entry.name
                if target.is_dir() and entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, target, symlinks=True, dirs_exist_ok=True)
                    shutil.rmtree(entry)
                else:
                    if target.exists() or target.is_symlink():
                        target.unlink()
                    entry.rename(target)
            top.rmdir()
        if usr.exists():
            top.symlink_to(f"usr/{name}")


def parse_deb_filename(filename: str) -> tuple[str, str] | None:
    """``libc6_2.36-9%2bdeb12u14_amd64.deb`` -> ``("libc6", "2.36-9+deb12u14")``."""
    match = _DEB.match(filename)
    if not match:
        return None
    return match["name"], unquote(match["version"])
