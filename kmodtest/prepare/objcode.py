"""Did a change reach the object code? A digest of each rebuilt module's code and data.

A module overlay's ``initrd.cpio`` is the base image's archive with the rebuilt modules
appended as a second cpio archive (:mod:`kmodtest.prepare.overlay`), so the ``.ko`` files are
read back from the bytes past the base archive. Each one is normalised with the suite's own
``objcopy`` in the toolchain chroot: the sections that name the source rather than the code
(``.modinfo`` holds ``srcversion``, a digest of the source text; the build-id note digests the
whole file) are removed, the rest (``.text``, ``.data``, ``.rodata``, relocations, symbols,
``__bug_table`` ...) stays. Two builds whose digests match behave the same.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from kmodtest import processes
from kmodtest.errors import BuildError
from kmodtest.prepare.images import Image
from kmodtest.prepare.toolchain import MOUNT_POINT, Toolchain

# sections that change with the source text but not with the code
SOURCE_ONLY_SECTIONS = (".modinfo", ".note.gnu.build-id")


def layer_modules(overlay: Image, base: Image, dest: Path) -> dict[str, Path]:
    """Extract the overlay's rebuilt modules into ``dest``: module name -> ``.ko``."""
    placed: dict[str, str] = overlay.manifest.get("overlay", {}).get("modules", {})
    if not placed:
        raise BuildError(f"{overlay.path} is not a module overlay (no overlay.modules)")
    offset = base.initrd.stat().st_size
    cpio = processes.require_tool("cpio", "cpio")
    with open(overlay.initrd, "rb") as archive:
        archive.seek(offset)
        subprocess.run(
            [cpio, "-i", "-d", "--quiet", "--no-absolute-filenames", *placed.values()],
            stdin=archive, cwd=dest, check=True,
        )  # fmt: skip
    out = {}
    for name, rel in placed.items():
        if not (dest / rel).is_file():
            raise BuildError(f"{rel} is not in the layer of {overlay.path}", "rebuild the overlay")
        out[name] = dest / rel
    return out


def code_digests(toolchain: Toolchain, overlay: Image, base: Image, work: Path) -> dict[str, str]:
    """Module name -> sha256 of its object code with the source-only sections removed."""
    with tempfile.TemporaryDirectory(dir=work, prefix="objcode-") as tmp:
        root = Path(tmp)
        (root / "ko").mkdir()
        modules = layer_modules(overlay, base, root / "ko")
        flat = {}
        for name, ko in modules.items():
            flat[name] = root / f"{name}.ko"
            shutil.move(ko, flat[name])
        removes = " ".join(f"--remove-section={s}" for s in SOURCE_ONLY_SECTIONS)
        script = f'for f in {MOUNT_POINT}/*.ko; do objcopy {removes} "$f" "$f.code"; done'
        log = root / "objcopy.log"
        if toolchain.run(["sh", "-c", script], root, log) != 0:
            raise BuildError(f"objcopy failed: {log.read_text()[-500:]}")
        return {
            name: hashlib.sha256((root / f"{name}.ko.code").read_bytes()).hexdigest()
            for name in sorted(flat)
        }
