"""A kmodtest STAND-IN for OpenWrt images: real formats, Debian contents. Never OpenWrt coverage.

OpenWrt's servers are not reachable everywhere kmodtest's own tests run, so the mechanics
OpenWrt cells depend on (download, resume, verification, both x86 boot paths, the arm64
initramfs kernel, the console bootstrap, the agent channel) are proven on files built here
in OpenWrt's formats from Debian packages kmodtest already fetches (the suite's kernel and
busybox-static):

- x86/64 ``ext4-combined.img.gz``: an MBR disk (signature = PARTUUID prefix) whose partition 1
  is ext4 labelled ``kernel`` with ``/boot/vmlinuz`` and ``/boot/grub/grub.cfg`` in OpenWrt's
  layout, GRUB's ``boot.img`` in the MBR and ``core.img`` after it (so SeaBIOS boots GRUB from
  the disk as shipped), and partition 2 the ext4 root; gzip with metadata after the stream.
- armsr/armv8 ``initramfs-kernel.bin``, ``kernel.bin`` and ``ext4-rootfs.img.gz``.
- a rootfs whose /sbin/init plays procd on the console (``standin_files/procd``), with
  ``/etc/openwrt_release`` and an opkg status file listing kmod-nft-offload.

Honest differences from OpenWrt, all from borrowing Debian's kernel: it has virtio-blk, ext4 and
virtio-console as modules, so a small initrd (``standin_files/init``) loads them; GRUB's entry
gains an ``initrd`` line and the arm64 boots get ``-initrd`` (the release lists a
``standin-initrd`` file, which no real release has); the arm64 "initramfs kernel" is Debian's
Image plus that initrd rather than one file. GRUB's boot sectors are written here (boot.img's
code into the MBR, core.img from sector 1: the offsets grub-bios-setup uses for an MBR gap)
because Debian's grub-bios-setup guesses the root device from the host filesystem holding its
files and so needs a real block device; OpenWrt's build uses a grub-bios-setup patched with a
``-r`` option for the same reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from kmodtest.arches import ARCHES
from kmodtest.errors import BuildError
from kmodtest.prepare import debian, modules
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.images import write_cpio
from kmodtest.prepare.kernels import DebianKernel, KernelTree
from kmodtest.prepare.keys import artifact_key
from kmodtest.processes import require_tool
from kmodtest.progress import Progress

VERSION = "standin"  # the stand-in's "release" in URLs and the manifest
PREFIX = "kmodtest-standin"  # file names: never "openwrt-..."
SUITE = "trixie"
DISK_SIGNATURE = 0x6B6D7464  # "kmtd"; PARTUUID=6b6d7464-02 names partition 2
GAP_SECTORS = 512  # 256 KiB before partition 1, as OpenWrt leaves for GRUB's core.img
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
# grub-mkimage modules: OpenWrt's list for x86 (target/linux/x86/image/Makefile)
GRUB_MODULES = (
    "biosdisk", "boot", "chain", "configfile", "ext2", "linux", "ls", "part_msdos", "reboot",
    "serial", "vga",
)  # fmt: skip
# the kernel command line OpenWrt's grub.cfg has (ext4 image, serial and VGA consoles)
GRUB_CMDLINE = (
    f"root=PARTUUID={DISK_SIGNATURE:08x}-02 rootfstype=ext4 rootwait "
    "console=tty1 console=ttyS0,115200n8 noinitrd"
)
# what the initrd loads: what OpenWrt builds in (block, ext4, console, virtio-net) and the NICs
MODULES = ("virtio_blk", "ext4", "virtio_console", "virtio_net")
OPTIONAL_MODULES = ("virtio_pci", "virtio_mmio", "crc32c_generic", "e1000", "e1000e", "igb")

TARGETS = {"x86_64": "x86/64", "arm64": "armsr/armv8"}


@dataclass(frozen=True)
class StandinFile:
    role: str
    name: str
    sha256: str


def _standin_file(name: str) -> bytes:
    return resources.files("kmodtest.prepare").joinpath("standin_files", name).read_bytes()


# the code that makes a stand-in: a change to any of it builds a new one
STANDIN_CODE = (
    "kmodtest.prepare.standin",
    "kmodtest.prepare.modules",
    "kmodtest.prepare.images",  # write_cpio
)


def standin_key(arch: str) -> str:
    """Cache key of one arch's stand-in: suite, arch, guest scripts and the code."""
    scripts = {n: hashlib.sha256(_standin_file(n)).hexdigest() for n in ("init", "procd")}
    return artifact_key({"suite": SUITE, "arch": arch, "scripts": scripts}, STANDIN_CODE)


def build_standin(cache: Cache, arch: str, progress: Progress) -> Path:
    """The stand-in files of one arch (cached): a target directory plus ``files.json``."""
    if arch not in TARGETS:
        raise BuildError(f"no stand-in for arch {arch}", f"use one of: {', '.join(TARGETS)}")

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="standin-", dir=cache.root) as tmp:
            _build(Path(tmp), arch, out, progress)

    return cache.get_or_build("standin", standin_key(arch), build)


def _build(work: Path, arch_name: str, out: Path, progress: Progress) -> None:
    arch = ARCHES[arch_name]
    package = {"x86_64": "linux-image-amd64", "arm64": "linux-image-arm64"}[arch_name]
    with progress.step(f"stand-in {arch_name}: fetching Debian packages ({SUITE})"):
        tree = debian.fetch(SUITE, arch.debian, [package, "busybox-static"], work, progress)
    kernel = DebianKernel(SUITE, package).locate(tree.root, arch)
    with progress.step(f"stand-in {arch_name}: assembling"):
        rootfs = work / "rootfs"
        _rootfs(tree.root, kernel, rootfs, arch_name)
        initrd = work / "initrd.cpio"
        write_cpio(rootfs, initrd)
        version = kernel.version.split("-")[0].split("+")[0]
        files: list[StandinFile] = []

        def publish(role: str, suffix: str, src: Path) -> None:
            name = f"{PREFIX}-{suffix}"
            shutil.copyfile(src, out / name)
            files.append(StandinFile(role, name, _sha256(out / name)))

        if arch_name == "x86_64":
            disk = work / "combined.img"
            _combined_disk(work, kernel.image, initrd, rootfs, disk)
            gz = work / "combined.img.gz"
            _gzip_with_metadata(disk, gz, "x86/64")
            publish("combined", "x86-64-generic-ext4-combined.img.gz", gz)
        else:
            publish("initramfs", "armsr-armv8-generic-initramfs-kernel.bin", kernel.image)
            publish("kernel", "armsr-armv8-generic-kernel.bin", kernel.image)
            root_img = work / "rootfs.img"
            _ext4(rootfs, root_img, label="rootfs")
            gz = work / "rootfs.img.gz"
            _gzip_with_metadata(root_img, gz, "armsr/armv8")
            publish("rootfs", "armsr-armv8-generic-ext4-rootfs.img.gz", gz)
            publish("standin-initrd", "armsr-armv8-standin-initrd.cpio", initrd)
        (out / "sha256sums").write_text("".join(f"{f.sha256} *{f.name}\n" for f in files))
        info = {
            "kernel": version,
            "kernel_release": kernel.version,
            "packages": tree.versions,
            "files": [vars(f) for f in files],
        }
        (out / "files.json").write_text(json.dumps(info, indent=2))


def _rootfs(debroot: Path, kernel: KernelTree, dst: Path, arch_name: str) -> None:
    """busybox, the kernel's modules for the initrd, the procd stand-in, OpenWrt's /etc files."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/standin", "proc", "sys", "dev", "tmp",
              "root", "usr/lib/opkg", "overlay", "rom"):  # fmt: skip
        (dst / d).mkdir(parents=True, exist_ok=True)
    busybox = debroot / "usr" / "bin" / "busybox"
    if not busybox.is_file():
        raise BuildError("busybox-static did not unpack usr/bin/busybox")
    shutil.copy2(busybox, dst / "bin" / "busybox")
    (dst / "bin" / "sh").symlink_to("busybox")
    for name, mode in (("init", 0o755), ("procd", 0o755)):
        target = dst / ("init" if name == "init" else "sbin/init")
        target.write_bytes(_standin_file(name))
        target.chmod(mode)
    modules.depmod(kernel.modules_root, kernel.version)
    mods = modules.closure(
        kernel.modules_root, kernel.version, list(MODULES), list(OPTIONAL_MODULES)
    )
    modules.install(mods, kernel.modules_root, dst, kernel.version)
    loadable = [m for m in (*OPTIONAL_MODULES[:3], *MODULES, *OPTIONAL_MODULES[3:])
                if m not in mods.missing]  # fmt: skip
    (dst / "etc" / "standin" / "modules").write_text(" ".join(loadable) + "\n")
    target = TARGETS[arch_name]
    (dst / "etc" / "openwrt_release").write_text(
        "DISTRIB_ID='kmodtest-stand-in'\n"
        f"DISTRIB_RELEASE='{VERSION}'\n"
        "DISTRIB_REVISION='debian'\n"
        f"DISTRIB_TARGET='{target}'\n"
        f"DISTRIB_ARCH='{ARCHES[arch_name].debian}'\n"
        "DISTRIB_DESCRIPTION='kmodtest stand-in, NOT OpenWrt (Debian kernel and busybox)'\n"
        "DISTRIB_TAINTS=''\n"
    )
    pkg_version = f"{kernel.version}-standin"
    status = []
    for name, depends in (
        ("kmod-nf-flow", "kernel, kmod-nf-conntrack"),
        ("kmod-nft-offload", "kernel, kmod-nf-flow, kmod-nft-nat"),
        ("busybox", "libc"),
    ):
        status.append(
            f"Package: {name}\nVersion: {pkg_version}\nDepends: {depends}\n"
            "Status: install user installed\n"
            f"Architecture: {ARCHES[arch_name].debian}\nInstalled-Time: 0\n"
        )
    (dst / "usr" / "lib" / "opkg" / "status").write_text("\n".join(status))
    (dst / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/ash\n")
    (dst / "etc" / "group").write_text("root:x:0:\n")
    (dst / "etc" / "banner").write_text(
        "  kmodtest STAND-IN (not OpenWrt): Debian kernel + busybox in OpenWrt's formats\n"
    )
    (dst / "bin" / "ash").symlink_to("busybox")


def _ext4(src: Path, image: Path, label: str, slack_mb: int = 16) -> None:
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    megabytes = size // (1 << 20) + slack_mb
    image.unlink(missing_ok=True)
    result = subprocess.run(
        [mkfs, "-q", "-F", "-L", label, "-d", str(src), "-E", "root_owner=0:0",
         str(image), f"{megabytes}M"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise BuildError(f"mkfs.ext4 {image.name} failed: {result.stderr.strip()}")


def _grub_core(work: Path) -> bytes:
    mkimage = require_tool("grub-mkimage", "grub-common")
    if not (GRUB_DIR / "boot.img").is_file():
        raise BuildError(
            f"{GRUB_DIR}/boot.img is missing", "install it: apt-get install grub-pc-bin"
        )
    early = work / "grub-early.cfg"
    early.write_text("set root=(hd0,msdos1)\nset prefix=($root)/boot/grub\n")
    core = work / "core.img"
    result = subprocess.run(
        [mkimage, "-p", "/boot/grub", "-d", str(GRUB_DIR), "-O", "i386-pc", "-c", str(early),
         "-o", str(core), *GRUB_MODULES],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise BuildError(f"grub-mkimage failed: {result.stderr.strip()}")
    data = core.read_bytes()
    if len(data) > (GAP_SECTORS - 1) * 512:
        raise BuildError(f"GRUB's core.img ({len(data)} bytes) does not fit the MBR gap")
    return data


def _grub_cfg() -> str:
    """OpenWrt's grub-pc.cfg shape, plus the stand-in's initrd line (see the module doc)."""
    return (
        "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1 --rtscts=off\n"
        "terminal_input console serial; terminal_output console serial\n\n"
        'set default="0"\nset timeout="1"\n'
        "set root='(hd0,msdos1)'\n\n"
        'menuentry "kmodtest stand-in (not OpenWrt)" {\n'
        f"\tlinux /boot/vmlinuz {GRUB_CMDLINE}\n"
        "\tinitrd /boot/standin-initrd.cpio\n"
        "}\n"
        'menuentry "kmodtest stand-in (failsafe)" {\n'
        f"\tlinux /boot/vmlinuz failsafe=true {GRUB_CMDLINE}\n"
        "}\n"
    )


def _combined_disk(work: Path, vmlinuz: Path, initrd: Path, rootfs: Path, disk: Path) -> None:
    boot = work / "p1"
    (boot / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(vmlinuz, boot / "boot" / "vmlinuz")
    shutil.copyfile(initrd, boot / "boot" / "standin-initrd.cpio")
    (boot / "boot" / "grub" / "grub.cfg").write_text(_grub_cfg())
    p1, p2 = work / "p1.img", work / "p2.img"
    _ext4(boot, p1, label="kernel", slack_mb=4)
    _ext4(rootfs, p2, label="rootfs")
    s1, s2 = p1.stat().st_size // 512, p2.stat().st_size // 512
    start2 = GAP_SECTORS + s1
    with open(disk, "wb") as handle:
        handle.truncate((start2 + s2) * 512)
    sfdisk = require_tool("sfdisk", "fdisk")
    table = (
        f"label: dos\nlabel-id: 0x{DISK_SIGNATURE:08x}\n"
        f"start={GAP_SECTORS}, size={s1}, type=83, bootable\n"
        f"start={start2}, size={s2}, type=83\n"
    )
    result = subprocess.run(
        [sfdisk, "-q", str(disk)], input=table, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BuildError(f"sfdisk failed: {result.stderr.strip()}")
    core = _grub_core(work)
    boot_img = (GRUB_DIR / "boot.img").read_bytes()
    with open(disk, "r+b") as handle:
        mbr = bytearray(handle.read(512))
        mbr[:0x1B8] = boot_img[:0x1B8]  # keep signature and partition table (0x1b8-0x1ff)
        handle.seek(0)
        handle.write(mbr)
        handle.write(core)  # sector 1: diskboot.img's default blocklist continues at sector 2
        for offset, part in ((GAP_SECTORS, p1), (start2, p2)):
            handle.seek(offset * 512)
            with open(part, "rb") as src:
                shutil.copyfileobj(src, handle, 1 << 20)


def _gzip_with_metadata(src: Path, dst: Path, target: str) -> None:
    """gzip -9n, then metadata after the stream the way OpenWrt's fwtool appends it."""
    with open(src, "rb") as fin, open(dst, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
            shutil.copyfileobj(fin, gz, 1 << 20)
        meta = json.dumps(
            {"metadata_version": "1.1", "compat_version": "1.0",
             "supported_devices": ["generic"],
             "version": {"dist": "kmodtest stand-in (not OpenWrt)", "version": VERSION,
                         "target": target}},
        ).encode()  # fmt: skip
        raw.write(meta)
        raw.write(b"FWx0" + struct.pack(">III", zlib.crc32(meta), 0, len(meta) + 16))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def serve_tree(cache: Cache, arches: list[str], root: Path, progress: Progress) -> Path:
    """Lay out the stand-in like an OpenWrt download server under ``root``.

    ``releases/standin/targets/<target>/`` holds each arch's files and ``sha256sums``; the
    returned ``openwrt-releases.yaml`` (next to ``root``) lists them with their sha256, except
    the armsr kernel.bin, left to the sha256sums file as real armsr kernel.bin files are.
    """
    targets: dict[str, dict[str, dict[str, str | None]]] = {}
    kernel = "0.0"
    for arch in arches:
        built = build_standin(cache, arch, progress)
        info = json.loads((built / "files.json").read_text())
        kernel = info["kernel"]
        directory = root / "releases" / VERSION / "targets" / TARGETS[arch]
        directory.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict[str, str | None]] = {}
        for f in info["files"]:
            (directory / f["name"]).symlink_to(built / f["name"])
            pinned = None if f["role"] == "kernel" else f["sha256"]
            files[f["role"]] = {"file": f["name"], "sha256": pinned}
        shutil.copyfile(built / "sha256sums", directory / "sha256sums")
        targets[TARGETS[arch]] = files
    manifest = {
        "base_url": "http://127.0.0.1:1",  # replaced by the server's address (--openwrt-mirror)
        "releases": [
            {"version": VERSION, "kernel": kernel, "packages": "opkg", "stand_in": True,
             "targets": targets},
        ],
    }  # fmt: skip
    out = root.parent / "openwrt-releases.yaml"
    out.write_text(
        "# kmodtest STAND-IN (not OpenWrt), generated by kmodtest/prepare/standin.py\n"
        + yaml.safe_dump(manifest, sort_keys=False)
    )
    return out
