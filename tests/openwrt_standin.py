"""Fixtures for the OpenWrt stand-in tests: the stand-in tree (built once, cached by content),
served over HTTP on 127.0.0.1, and cells pointing at it. The stand-in is Debian's kernel and
busybox in OpenWrt's formats (kmodtest/prepare/standin.py): it proves kmodtest's mechanics,
never OpenWrt itself."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodtest.prepare.cache import Cache, default_cache_dir
from kmodtest.prepare.cells import Matrix, load_matrix
from kmodtest.prepare.openwrt import OpenWrtImages
from kmodtest.prepare.standin import serve_tree
from kmodtest.progress import Progress
from tests.standin_server import StandinServer

REPO = Path(__file__).resolve().parents[1]

CELLS = """\
cells:
  - id: debian-trixie-amd64
    arch: x86_64
    source: {kind: debian, suite: trixie, kernel_package: linux-image-amd64}
    default: true
  - id: standin-x86-64
    arch: x86_64
    source: {kind: openwrt, version: standin, target: x86/64}
    memory_mb: 256
  - id: standin-x86-64-firmware
    arch: x86_64
    source: {kind: openwrt, version: standin, target: x86/64, boot: firmware}
    memory_mb: 256
  - id: standin-armsr-armv8
    arch: arm64
    source: {kind: openwrt, version: standin, target: armsr/armv8}
    memory_mb: 256
  - id: standin-armsr-armv8-kernel-rootfs
    arch: arm64
    source: {kind: openwrt, version: standin, target: armsr/armv8, boot: kernel-rootfs}
    memory_mb: 256
"""


@dataclass(frozen=True)
class StandinTree:
    www: Path  # served as the download server's root
    images_dir: Path  # openwrt-releases.yaml (the stand-in's) + debian-router.yaml
    kernels_dir: Path
    matrix: Matrix


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> StandinTree:
    root = tmp_path_factory.mktemp("standin")
    www = root / "www"
    # built once per content key in the shared cache (a cold build fetches Debian packages)
    serve_tree(Cache(default_cache_dir()), ["x86_64", "arm64"], www, Progress(quiet=True))
    shutil.copy(REPO / "images" / "debian-router.yaml", root / "debian-router.yaml")
    kernels = root / "kernels"
    kernels.mkdir()
    (kernels / "standin.yaml").write_text(CELLS)
    return StandinTree(www, root, kernels, load_matrix(kernels))


@pytest.fixture
def standin_server(standin: StandinTree) -> Iterator[StandinServer]:
    with StandinServer(standin.www) as server:
        yield server


@pytest.fixture
def standin_images(tmp_path: Path, standin: StandinTree, standin_server: StandinServer):
    """OpenWrt images of the stand-in cells, fetched from the local server into a cold cache."""
    return OpenWrtImages(Cache(tmp_path / "cache"), standin.images_dir, mirror=standin_server.url)
