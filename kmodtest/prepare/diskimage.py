"""Read OpenWrt's image formats without root or loop devices.

- ``.img.gz``: a gzip stream followed by sysupgrade metadata (``gunzip`` warns "trailing
  garbage ignored" and exits 2); only the first member is the image.
- ``combined.img``: an MBR disk; partition 1 is the ext4 ``kernel`` partition holding
  ``/boot/vmlinuz`` and ``/boot/grub/grub.cfg``, partition 2 the root filesystem.
- files inside an ext4 partition are read with e2fsprogs' ``debugfs`` at the partition's byte
  offset in the disk image (``image?offset=N``), so nothing is mounted.
"""

from __future__ import annotations

import re
import shlex
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from kmodtest.errors import BuildError
from kmodtest.processes import require_tool

SECTOR = 512
_CHUNK = 1 << 20


def gunzip_first_member(src: Path, dst: Path) -> int:
    """Decompress the first gzip member of ``src`` into ``dst``; return the trailing byte count.

    OpenWrt appends sysupgrade metadata after the gzip stream; it is not part of the image.
    """
    decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header, one member
    trailing = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while not decomp.eof and (block := fin.read(_CHUNK)):
            try:
                fout.write(decomp.decompress(block))
            except zlib.error as exc:
                raise BuildError(
                    f"{src.name} is not a valid gzip file: {exc}",
                    "delete it from the cache (kmodtest cache) and fetch again",
                ) from None
        if not decomp.eof:
            raise BuildError(
                f"{src.name}: the gzip stream ends early (truncated file)",
                "fetch it again; the download was verified, so the published file itself is bad",
            )
        trailing = len(decomp.unused_data) + sum(
            len(b) for b in iter(lambda: fin.read(_CHUNK), b"")
        )
    return trailing


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: int  # MBR partition type byte (0x83 Linux)
    bootable: bool


@dataclass(frozen=True)
class MbrDisk:
    signature: str  # disk identifier as OpenWrt's PARTUUID prefix prints it: 8 hex digits
    partitions: tuple[Partition, ...]

    def partition(self, number: int) -> Partition:
        for part in self.partitions:
            if part.number == number:
                return part
        raise BuildError(f"the disk image has no partition {number}")


def read_mbr(image: Path) -> MbrDisk:
    """The MBR of a raw disk image: its signature and the four primary partitions."""
    with open(image, "rb") as handle:
        sector = handle.read(SECTOR)
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        raise BuildError(f"{image.name} has no MBR partition table (no 55aa signature)")
    (signature,) = struct.unpack_from("<I", sector, 440)
    parts = []
    for index in range(4):
        entry = sector[446 + 16 * index : 446 + 16 * (index + 1)]
        status, ptype = entry[0], entry[4]
        lba, count = struct.unpack_from("<II", entry, 8)
        if ptype and count:
            parts.append(Partition(index + 1, lba * SECTOR, count * SECTOR, ptype, status == 0x80))
    return MbrDisk(f"{signature:08x}", tuple(parts))


def ext4_read(image: Path, offset: int, path: str, dst: Path) -> bool:
    """Copy ``path`` out of the ext4 filesystem at byte ``offset`` of ``image``; False if absent."""
    debugfs = require_tool("debugfs", "e2fsprogs")
    dst.unlink(missing_ok=True)
    result = subprocess.run(
        [debugfs, "-R", f"dump {shlex.quote(path)} {shlex.quote(str(dst))}",
         f"{image}?offset={offset}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if "Bad magic number" in result.stderr or "Filesystem not open" in result.stderr:
        raise BuildError(
            f"{image.name}: no ext4 filesystem at byte {offset}: {result.stderr.strip()[-300:]}"
        )
    return dst.is_file()


@dataclass(frozen=True)
class GrubEntry:
    """The default menu entry of a GRUB config: kernel path, its arguments, an initrd if any."""

    kernel: str
    args: str
    initrd: str | None


_MENUENTRY = re.compile(r"^\s*menuentry\b")
_LINUX = re.compile(r"^\s*linux\s+(\S+)\s*(.*)$")
_INITRD = re.compile(r"^\s*initrd\s+(\S+)")
_BRANCH_END = re.compile(r"^\s*(?:(?:else|elif|fi|linux)\b|})")


def default_grub_entry(config: str) -> GrubEntry:
    """The first ``linux`` line (and ``initrd`` line) of the first menuentry.

    OpenWrt's ``grub-pc.cfg`` puts a microcode branch first in its entry; its first ``linux``
    line is the one a machine without microcode files boots (``... noinitrd``).
    """
    kernel = args = None
    initrd = None
    in_entry = False
    for line in config.splitlines():
        if _MENUENTRY.match(line):
            if in_entry:
                break
            in_entry = True
            continue
        if not in_entry:
            continue
        if kernel is None:
            if m := _LINUX.match(line):
                kernel, args = m[1], m[2].strip()
            continue
        # the lines right after the linux line, up to the end of its branch or entry
        if (m := _INITRD.match(line)) and not m[1].startswith("$"):
            initrd = m[1]
        if _BRANCH_END.match(line) or _INITRD.match(line):
            break
    if kernel is None or args is None:
        raise BuildError("the GRUB config has no menuentry with a linux line")
    return GrubEntry(kernel, args, initrd)
