"""The default cell's kernel package, unpacked as installed (what ``bench-boot`` gives virtme-ng).

Fetches one real package from the Debian archive (about 40 MB, once per kernel version: it is a
cache entry). No VM.
"""

from __future__ import annotations

from pathlib import Path

from kmodtest.prepare.cache import Cache, default_cache_dir
from kmodtest.prepare.cells import load_matrix
from kmodtest.prepare.images import ImageBuilder
from kmodtest.prepare.kernelpackage import get_kernel_package
from kmodtest.prepare.overlay import kernel_packages
from kmodtest.progress import Progress

# what a 9p-root guest needs from a Debian kernel, which builds them as modules
NINE_P_ROOT = ("fs/9p/9p.ko", "net/9p/9pnet_virtio.ko")


def test_default_cells_kernel_package_holds_the_images_kernel_and_its_modules(repo: Path):
    cache = Cache(default_cache_dir())
    cell = load_matrix(repo / "kernels").default
    image = ImageBuilder(cache, repo / "images", Progress(quiet=True)).get(cell)
    packages = kernel_packages(cell, image)

    kernel = get_kernel_package(cache, packages, Progress(quiet=True))

    release = image.kernel_version
    assert kernel.name == f"vmlinuz-{release}"
    assert kernel.read_bytes() == image.kernel.read_bytes(), "not the image's kernel file"
    moddir = kernel.parent.parent / "lib/modules" / release
    dep = (moddir / "modules.dep").read_text()
    for module in NINE_P_ROOT:
        assert f"kernel/{module}" in dep, f"{module} is not in {moddir}/modules.dep"
    again = get_kernel_package(cache, packages, Progress(quiet=True))
    assert again == kernel, "a second call built another entry"
