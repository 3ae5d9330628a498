"""OpenWrt images as a kernel source: release manifest, fetch, verify, and prepare for booting.

An OpenWrt cell (``source: {kind: openwrt, ...}`` in ``kernels/*.yaml``) names a release of
``images/openwrt-releases.yaml`` and a target, or the user's own image files. Its image is
not built: it is downloaded (:mod:`kmodtest.prepare.download`), verified against the published
sha256, and prepared for the cell's boot path: the combined x86 disk decompressed (first gzip
member only) with ``/boot/vmlinuz`` and GRUB's command line read out of partition 1; the armsr
kernel files as they are, the ext4 rootfs decompressed. Everything lands in the cache through
:meth:`Cache.get_or_build`; nothing here boots or modifies the cached files (machines get a
qcow2 overlay).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

from pydantic import BaseModel, ConfigDict, Field

from kmodtest.errors import BuildError, ConfigError
from kmodtest.prepare import diskimage
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell, OpenWrtSource
from kmodtest.prepare.download import DownloadError, Remote, fetch_text, fetch_verified
from kmodtest.prepare.images import PublishedImage
from kmodtest.prepare.keys import artifact_key
from kmodtest.prepare.yamlfile import load_model
from kmodtest.progress import Progress

RELEASES_FILE = "openwrt-releases.yaml"
MIRROR_ENV = "KMODTEST_OPENWRT_MIRROR"
_SHA = r"^[0-9a-f]{64}$"

# The files each boot path needs, by role. ``standin-initrd`` exists only in kmodtest's
# stand-in (Debian's kernel needs its block and ext4 modules from an initrd; OpenWrt's kernels
# have them built in): a release that lists it gets it passed with -initrd.
BOOT_ROLES: dict[str, tuple[str, ...]] = {
    "direct": ("combined",),
    "firmware": ("combined",),
    "initramfs": ("initramfs",),
    "kernel-rootfs": ("kernel", "rootfs"),
}
OPTIONAL_ROLES: dict[str, tuple[str, ...]] = {
    "initramfs": ("standin-initrd",),
    "kernel-rootfs": ("standin-initrd",),
}
OFFLOAD_PACKAGE = "kmod-nft-offload"
OPKG_STATUS = "/usr/lib/opkg/status"  # opkg, up to 24.10
APK_INSTALLED = "/lib/apk/db/installed"  # apk, from 25.12
# OpenWrt's own command line for kernel.bin + ext4-rootfs (scripts/qemustart, openwrt-tests)
KERNEL_ROOTFS_CMDLINE = "root=/dev/vda rootwait"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    file: str
    sha256: str | None = Field(pattern=_SHA)  # None: not published where we looked


class ReleaseSpec(_Strict):
    version: str
    kernel: str
    packages: Literal["opkg", "apk"]
    stand_in: bool = False  # kmodtest's own stand-in, never OpenWrt coverage
    targets: dict[str, dict[str, FileSpec]]


class ReleasesFile(_Strict):
    base_url: str
    releases: tuple[ReleaseSpec, ...]


def load_releases(images_dir: Path) -> ReleasesFile:
    path = images_dir / RELEASES_FILE
    if not path.is_file():
        raise ConfigError(
            f"no OpenWrt release manifest {path}",
            f"OpenWrt cells need {RELEASES_FILE} in the images directory (--images-dir)",
        )
    return load_model(path, ReleasesFile, f"edit {path} (schema: kmodtest/prepare/openwrt.py)")


@dataclass(frozen=True)
class Artifact:
    """One file a cell needs: its role, where it comes from, the sha256 it must have."""

    role: str
    name: str
    url: str
    sha256: str | None  # None: read from the release's sha256sums at fetch time
    sums_url: str | None = None  # the release's sha256sums (for sha256 None)

    @property
    def key(self) -> str:
        """Cache key of the downloaded file: its sha256 (content is all a download is), or for
        an unpinned file its name and the sha256sums that will vouch for it."""
        if self.sha256:
            return self.sha256
        return "unpinned-" + artifact_key({"file": self.name, "sums": self.sums_url}, ())


# the code that turns downloads into a bootable set: a change to it must not reuse old sets
PREPARER_CODE = ("kmodtest.prepare.openwrt", "kmodtest.prepare.diskimage")


@dataclass(frozen=True)
class OpenWrtImage(PublishedImage):
    """A prepared OpenWrt image in the cache: what a machine boots, and what it is."""

    def _file(self, name: str) -> Path | None:
        rel = self.manifest["files"].get(name)
        return self.path / rel if rel else None

    @property
    def disk(self) -> Path | None:
        """Raw disk image (x86 combined, armsr rootfs); boot a qcow2 overlay of it, never it."""
        return self._file("disk")

    @property
    def kernel(self) -> Path | None:
        return self._file("kernel")

    @property
    def initrd(self) -> Path | None:
        return self._file("initrd")

    @property
    def cmdline(self) -> str | None:
        return self.manifest.get("cmdline")

    @property
    def release(self) -> str:
        return str(self.manifest["release"])

    @property
    def stand_in(self) -> bool:
        return bool(self.manifest["stand_in"])

    @property
    def packages(self) -> str:
        return str(self.manifest["packages"])

    @property
    def offload_package(self) -> str | None:
        """kmod-nft-offload's version as the image's root filesystem lists it (None: not read,
        e.g. an initramfs kernel, or not installed)."""
        value = self.manifest.get("offload_package")
        return str(value) if value else None

    @property
    def description(self) -> str:
        what = "kmodtest STAND-IN (not OpenWrt)" if self.stand_in else "OpenWrt"
        return f"{what} {self.release} {self.manifest['target']}"


class OpenWrtImages:
    """Resolves OpenWrt cells to artifacts; fetches, verifies and prepares them once."""

    def __init__(
        self,
        cache: Cache,
        images_dir: Path,
        progress: Progress | None = None,
        mirror: str | None = None,
    ) -> None:
        self.cache = cache
        self.images_dir = images_dir
        self.progress = progress or Progress(quiet=True)
        self.mirror = mirror or os.environ.get(MIRROR_ENV) or None

    @functools.cached_property
    def releases(self) -> ReleasesFile:
        return load_releases(self.images_dir)

    def release(self, cell: Cell) -> ReleaseSpec | None:
        src = _source(cell)
        if src.version is None:
            return None
        for release in self.releases.releases:
            if release.version == src.version:
                return release
        known = ", ".join(r.version for r in self.releases.releases)
        raise ConfigError(
            f"cell {cell.id}: OpenWrt release {src.version} is not in "
            f"{self.images_dir / RELEASES_FILE} (known: {known})",
            "add the release there (file names, sha256, kernel) or pick a listed one",
        )

    def artifacts(self, cell: Cell) -> list[Artifact]:
        src = _source(cell)
        boot = src.boot_path
        roles = BOOT_ROLES[boot]
        if src.files is not None:  # a local build: the user's files, pinned by the user
            missing = [r for r in roles if r not in src.files]
            if missing:
                raise ConfigError(
                    f"cell {cell.id}: boot {boot} needs files {', '.join(missing)}",
                    f"add them under source.files in {cell.origin}",
                )
            wanted = [*roles, *(r for r in OPTIONAL_ROLES.get(boot, ()) if r in src.files)]
            local = {r: src.files[r].path.expanduser().absolute() for r in wanted}
            return [
                Artifact(r, local[r].name, local[r].as_uri(), src.files[r].sha256) for r in wanted
            ]
        release = self.release(cell)
        assert release is not None
        files = release.targets.get(src.target)
        if files is None:
            raise ConfigError(f"cell {cell.id}: release {release.version} lists no {src.target}")
        missing = [r for r in roles if r not in files]
        if missing:
            raise ConfigError(
                f"cell {cell.id}: release {release.version} {src.target} has no "
                f"{', '.join(missing)} file for boot {boot}",
                f"add it to {self.images_dir / RELEASES_FILE} or pick another boot",
            )
        base = (self.mirror or self.releases.base_url).rstrip("/")
        directory = f"{base}/releases/{release.version}/targets/{src.target}"
        wanted = [*roles, *(r for r in OPTIONAL_ROLES.get(boot, ()) if r in files)]
        return [
            Artifact(r, files[r].file, f"{directory}/{files[r].file}", files[r].sha256,
                     f"{directory}/sha256sums")
            for r in wanted
        ]  # fmt: skip

    def kernel_version(self, cell: Cell) -> str:
        src = _source(cell)
        release = self.release(cell)
        return release.kernel if release else str(src.kernel)

    def _prepared_key(self, cell: Cell, artifacts: list[Artifact]) -> str:
        src = _source(cell)
        inputs = {"target": src.target, "files": sorted((a.role, a.key) for a in artifacts)}
        return artifact_key(inputs, PREPARER_CODE)

    def _download_dir(self, artifact: Artifact) -> Path:
        return self.cache.path("downloads", artifact.key)

    def cached(self, cell: Cell) -> OpenWrtImage | None:
        """The prepared image if everything is in the cache (no network)."""
        path = self.cache.path("openwrt", self._prepared_key(cell, self.artifacts(cell)))
        return OpenWrtImage(path) if (path / "manifest.json").is_file() else None

    def missing(self, cell: Cell, fetch_command: str) -> str | None:
        """Why the cell cannot boot from the cache, with the command that fixes it; or None."""
        artifacts = self.artifacts(cell)
        for artifact in artifacts:
            if artifact.url.startswith("file:"):
                path = Path(url2pathname(urlparse(artifact.url).path))
                if not path.is_file():
                    return f"local OpenWrt image {path} (role {artifact.role}) does not exist"
        if self.cached(cell) is not None:
            return None
        absent = [a.name for a in artifacts if not (self._download_dir(a) / a.name).is_file()] or [
            a.name for a in artifacts
        ]
        return (
            f"OpenWrt image {', '.join(absent)} is not in the cache ({self.cache.root}); "
            f"fix: {fetch_command}"
        )

    def fetch(self, cell: Cell) -> OpenWrtImage:
        """Download (or reuse), verify and prepare everything the cell boots."""
        artifacts = self.artifacts(cell)
        downloaded: dict[str, tuple[Path, Artifact, str, str]] = {}
        for artifact in artifacts:
            sha, origin = self._expected_sha(cell, artifact)
            remote = Remote(artifact.url, artifact.name, sha)
            note = {"url": artifact.url, "sha256": sha, "sha256_from": origin}
            directory = fetch_verified(
                self.cache, "downloads", artifact.key, remote, self.progress, note
            )
            downloaded[artifact.role] = (directory / artifact.name, artifact, sha, origin)
        key = self._prepared_key(cell, artifacts)

        def build(out: Path) -> None:
            with self.progress.step(f"{cell.id}: preparing {_source(cell).target} image"):
                self._prepare(cell, downloaded, out)

        return OpenWrtImage(self.cache.get_or_build("openwrt", key, build))

    def _expected_sha(self, cell: Cell, artifact: Artifact) -> tuple[str, str]:
        if artifact.sha256:
            where = "the cell" if _source(cell).files is not None else RELEASES_FILE
            return artifact.sha256, where
        directory = self._download_dir(artifact)
        if (directory / artifact.name).is_file():  # verified when it was fetched
            return json.loads((directory / "source.json").read_text())["sha256"], "cache"
        assert artifact.sums_url is not None
        sums = fetch_text(artifact.sums_url)
        for line in sums.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == artifact.name:
                self.progress.detail(f"{artifact.name}: sha256 from {artifact.sums_url}")
                return parts[0], f"{artifact.sums_url} (pin it in {RELEASES_FILE})"
        raise DownloadError(
            f"{artifact.name}: no sha256 in {RELEASES_FILE} and none in {artifact.sums_url}",
            f"add the published sha256 to {self.images_dir / RELEASES_FILE}",
        )

    def _prepare(
        self, cell: Cell, downloaded: dict[str, tuple[Path, Artifact, str, str]], out: Path
    ) -> None:
        src = _source(cell)
        release = self.release(cell)
        files: dict[str, str] = {}
        cmdline: str | None = None
        grub: dict[str, Any] | None = None
        root_offset: int | None = None  # of an ext4 root filesystem in files["disk"]
        if "combined" in downloaded:
            gz = downloaded["combined"][0]
            disk = out / "combined.img"
            self.progress.detail(f"decompressing {gz.name} (first gzip member)")
            trailing = diskimage.gunzip_first_member(gz, disk)
            mbr = diskimage.read_mbr(disk)
            kernel_part = mbr.partition(1)
            if not diskimage.ext4_read(
                disk, kernel_part.start, "/boot/grub/grub.cfg", out / "grub.cfg"
            ):
                raise BuildError(f"{gz.name}: partition 1 has no /boot/grub/grub.cfg")
            entry = diskimage.default_grub_entry((out / "grub.cfg").read_text())
            if not diskimage.ext4_read(disk, kernel_part.start, entry.kernel, out / "vmlinuz"):
                raise BuildError(
                    f"{gz.name}: partition 1 has no {entry.kernel} (named by grub.cfg)"
                )
            files.update(disk="combined.img", kernel="vmlinuz")
            if entry.initrd:
                if not diskimage.ext4_read(disk, kernel_part.start, entry.initrd, out / "initrd"):
                    raise BuildError(f"{gz.name}: partition 1 has no {entry.initrd}")
                files["initrd"] = "initrd"
            cmdline = entry.args
            root_offset = mbr.partition(2).start
            grub = {"signature": mbr.signature, "trailing_bytes": trailing,
                    "partitions": [vars(p) for p in mbr.partitions]}  # fmt: skip
        if "initramfs" in downloaded:
            _link(downloaded["initramfs"][0], out / "kernel")
            files["kernel"] = "kernel"
        if "kernel" in downloaded:
            _link(downloaded["kernel"][0], out / "kernel")
            files["kernel"] = "kernel"
        if "rootfs" in downloaded:
            gz = downloaded["rootfs"][0]
            self.progress.detail(f"decompressing {gz.name} (first gzip member)")
            diskimage.gunzip_first_member(gz, out / "rootfs.img")
            files["disk"] = "rootfs.img"
            root_offset = 0
            cmdline = KERNEL_ROOTFS_CMDLINE
        if "standin-initrd" in downloaded:
            _link(downloaded["standin-initrd"][0], out / "initrd")
            files["initrd"] = "initrd"
        manager = release.packages if release else _package_manager_guess(src)
        offload = None
        if root_offset is not None:
            offload = _offload_package(out / files["disk"], root_offset, manager, out)
        manifest = {
            "offload_package": offload,  # kmod-nft-offload's version in the root fs, if read
            "cell": cell.id,
            "release": release.version if release else "local build",
            "target": src.target,
            "stand_in": bool(release and release.stand_in),
            "packages": manager,
            "kernel_version": self.kernel_version(cell),
            "files": files,
            "cmdline": cmdline,
            "grub": grub,
            "sources": {
                role: {"file": a.name, "url": a.url, "sha256": sha, "sha256_from": origin}
                for role, (_p, a, sha, origin) in downloaded.items()
            },
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    manager: str  # opkg | apk


def installed_package(database: str, manager: str, name: str) -> Package | None:
    """``name``'s entry in an opkg status file or an apk installed database."""
    for block in database.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if manager == "opkg" and ": " in line:
                key, value = line.split(": ", 1)
                fields.setdefault(key, value)
            elif manager == "apk" and len(line) > 2 and line[1] == ":":
                fields.setdefault(line[0], line[2:])
        got = fields.get("Package") if manager == "opkg" else fields.get("P")
        if got == name:
            version = fields.get("Version") if manager == "opkg" else fields.get("V")
            return Package(name, version or "?", manager)
    return None


def database_path(manager: str) -> str:
    return OPKG_STATUS if manager == "opkg" else APK_INSTALLED


def _offload_package(disk: Path, offset: int, manager: str, work: Path) -> str | None:
    """kmod-nft-offload's version in the package database of an ext4 root filesystem."""
    db = work / "packages.db"
    if not diskimage.ext4_read(disk, offset, database_path(manager), db):
        return None
    package = installed_package(db.read_text(errors="replace"), manager, OFFLOAD_PACKAGE)
    db.unlink()
    return package.version if package else None


def _package_manager_guess(src: OpenWrtSource) -> str:
    """A local build's package manager: apk from 25.12 (kernel 6.12), opkg before."""
    major, minor = (int(x) for x in str(src.kernel).split(".")[:2])
    return "apk" if (major, minor) >= (6, 12) else "opkg"


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _source(cell: Cell) -> OpenWrtSource:
    src = cell.openwrt
    if src is None:
        raise ConfigError(f"cell {cell.id} is not an OpenWrt cell")
    return src
