"""A Debian kernel package unpacked as a host that installed it has it, as a cache entry.

``boot/vmlinuz-<release>`` next to ``lib/modules/<release>/``: the layout in which tools that
find a kernel's modules from the kernel file's path (virtme-ng's ``vng --run``) see them. The
image's kernel file alone is not enough for them: Debian builds 9p and its virtio transport as
modules, and without them such a tool's guest cannot mount its 9p root.
"""

from __future__ import annotations

import json
from pathlib import Path

from kmodtest.errors import BuildError
from kmodtest.prepare import modules
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.keys import artifact_key
from kmodtest.prepare.toolchain import KernelPackages, fetch_packages
from kmodtest.progress import Progress

# Bump when the tree's layout changes in a way the key does not capture.
KERNEL_PACKAGE_LAYOUT = 1
KERNEL_PACKAGE_CODE = ("kmodtest.prepare.kernelpackage", "kmodtest.prepare.debian")
# an mmdebstrap extract hook ($1: the tree): download linux-image-<release>=<version> with the
# run's apt setup and unpack it alone (its dependencies are userland the tools bring themselves)
_IMAGE_HOOK = (
    'set -e; export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"; mkdir -p "$1/.dl"; cd "$1/.dl"; '
    "apt-get -q -o APT::Sandbox::User=root download '{package}={version}'; "
    'for d in *.deb; do dpkg-deb -x "$d" "$1"; echo "$d" >> "$1/.kmodtest-debs"; done; '
    'cd /; rm -rf "$1/.dl"'
)


def kernel_package_key(kernel: KernelPackages) -> str:
    inputs = {"layout": KERNEL_PACKAGE_LAYOUT, "kind": "kernel-package", **kernel.key_material()}
    return artifact_key(inputs, KERNEL_PACKAGE_CODE)


def get_kernel_package(cache: Cache, kernel: KernelPackages, progress: Progress) -> Path:
    """The installed ``linux-image-<release>`` tree's kernel file: ``<root>/boot/vmlinuz-<release>``
    (``<root>/lib/modules/<release>/`` holds its modules, with ``modules.dep``)."""
    package = f"linux-image-{kernel.release}"

    def build(out: Path) -> None:
        with progress.step(f"kernel package {package}={kernel.version} ({kernel.debian_arch})"):
            hook = _IMAGE_HOOK.format(package=package, version=kernel.version)
            tree = fetch_packages(kernel, [], out, progress, hooks=(f"--extract-hook={hook}",))
            kernel_file = _kernel_file(tree.root, kernel.release)
            if not (tree.root / "lib/modules" / kernel.release / "modules.order").is_file():
                raise BuildError(
                    f"{package}={kernel.version} ({kernel.debian_arch}) unpacked no "
                    f"lib/modules/{kernel.release}/modules.order",
                    "check that the package exists for this arch in the suite",
                )
            # here, not by the tool at its first use: a published entry is never written to
            modules.depmod(tree.root, kernel.release)
            meta = {"package": f"{package}={kernel.version}", "arch": kernel.debian_arch,
                    "kernel": str(kernel_file.relative_to(out))}  # fmt: skip
            (out / "kernel-package.json").write_text(json.dumps(meta, indent=2) + "\n")

    entry = cache.get_or_build("kernel-packages", kernel_package_key(kernel), build)
    meta = json.loads((entry / "kernel-package.json").read_text())
    return entry / meta["kernel"]


def _kernel_file(root: Path, release: str) -> Path:
    """``boot/vmlinuz-<release>``; newer packages install only ``lib/modules/<release>/vmlinuz``
    and are linked there, where a host's kernel-install would put it."""
    boot = root / "boot" / f"vmlinuz-{release}"
    if boot.is_file():
        return boot
    in_modules = root / "lib/modules" / release / "vmlinuz"
    if not in_modules.is_file():
        raise BuildError(
            f"linux-image-{release} unpacked neither boot/vmlinuz-{release} nor "
            f"lib/modules/{release}/vmlinuz",
            "check the cell's kernel package in kernels/*.yaml",
        )
    boot.parent.mkdir(exist_ok=True)
    boot.symlink_to(f"../lib/modules/{release}/vmlinuz")
    return boot
