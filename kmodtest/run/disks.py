"""Private disks for a machine: a qcow2 overlay over a cached image, never the image itself.

A booted OpenWrt writes to its root filesystem (overlay, uci, logs); the cached download must
stay byte-identical for the next run and for other workers, so each machine gets a qcow2 file
in its own run directory whose reads fall through to the cached raw image.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from kmodtest.errors import MachineError
from kmodtest.processes import require_tool
from kmodtest.run.machine import Disk


def overlay(base: Path, path: Path, base_format: str = "raw") -> Disk:
    """Create ``path`` as a qcow2 overlay of ``base`` and describe it as a :class:`Disk`."""
    qemu_img = require_tool("qemu-img", "qemu-utils", "disk overlays", MachineError)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base.absolute()), "-F", base_format,
         str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise MachineError(
            f"qemu-img could not create an overlay of {base}: {result.stderr.strip()}"
        )
    return Disk(path, "qcow2")
