"""OpenWrt cells as data: the release manifest, the cell schema, and the skip reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import load_matrix
from kmodtest.prepare.openwrt import OpenWrtImages, load_releases

# the published sha256 list the manifest was written from: shared/ beside the checkout (CI),
# or beside the directory of worktrees
_CANDIDATES = [p / "shared" / "openwrt-releases.txt" for p in Path(__file__).resolve().parents[2:4]]
PUBLISHED = next((p for p in _CANDIDATES if p.is_file()), _CANDIDATES[0])

BASE = """\
cells:
  - id: d
    arch: x86_64
    source: {kind: debian, suite: trixie, kernel_package: linux-image-amd64}
    default: true
"""


def write(tmp_path: Path, cell: str) -> Path:
    (tmp_path / "m.yaml").write_text(BASE + cell)
    return tmp_path


def test_every_repository_openwrt_cell_resolves(repo, tmp_path):
    matrix = load_matrix(repo / "kernels")
    images = OpenWrtImages(Cache(tmp_path), repo / "images")
    cells = [c for c in matrix.cells if c.openwrt is not None]
    assert {c.openwrt.target for c in cells} == {"x86/64", "armsr/armv8"}
    assert {c.openwrt.version[:5] for c in cells} == {"23.05", "24.10", "25.12"}
    for cell in cells:
        artifacts = images.artifacts(cell)
        assert artifacts, cell.id
        for artifact in artifacts:
            assert artifact.url.endswith(
                f"/releases/{cell.openwrt.version}/targets/{cell.openwrt.target}/{artifact.name}"
            )


def test_manifest_hashes_are_the_published_ones(repo):
    if not PUBLISHED.is_file():
        pytest.skip(f"{PUBLISHED} (the published sha256 list) is not beside this checkout")
    published = {}
    for line in PUBLISHED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _version, name, sha = line.split()
            published[name] = sha
    pinned = unpinned = 0
    for release in load_releases(repo / "images").releases:
        for files in release.targets.values():
            for spec in files.values():
                if spec.sha256 is None:
                    assert spec.file not in published, f"{spec.file}: published hash left out"
                    unpinned += 1
                else:
                    assert published.get(spec.file) == spec.sha256, spec.file
                    pinned += 1
    assert pinned and unpinned  # both kinds are present in the repository manifest


def test_target_must_match_arch(tmp_path):
    cell = (
        "  - id: o\n    arch: arm64\n"
        "    source: {kind: openwrt, version: 24.10.5, target: x86/64}\n"
    )
    with pytest.raises(ConfigError, match="OpenWrt target x86/64 runs on arch x86_64"):
        load_matrix(write(tmp_path, cell))


def test_boot_must_be_one_of_the_targets(tmp_path):
    cell = (
        "  - id: o\n    arch: arm64\n"
        "    source: {kind: openwrt, version: 24.10.5, target: armsr/armv8, boot: firmware}\n"
    )
    with pytest.raises(ConfigError, match="boot 'firmware' is not one of armsr/armv8's"):
        load_matrix(write(tmp_path, cell))


def test_version_or_files_not_both(tmp_path):
    cell = (
        "  - id: o\n    arch: x86_64\n    source: {kind: openwrt, target: x86/64, kernel: '6.6',"
        " version: 24.10.5, files: {combined: {path: /x, sha256: " + "a" * 64 + "}}}\n"
    )
    with pytest.raises(ConfigError, match="either version"):
        load_matrix(write(tmp_path, cell))


def test_unknown_release_lists_the_known_ones(repo, tmp_path):
    cell = (
        "  - id: o\n    arch: x86_64\n    source: {kind: openwrt, version: 9.9.9, target: x86/64}\n"
    )
    matrix = load_matrix(write(tmp_path, cell))
    images = OpenWrtImages(Cache(tmp_path / "c"), repo / "images")
    with pytest.raises(ConfigError, match=r"release 9\.9\.9 is not in .*24\.10\.5"):
        images.artifacts(matrix.get("o"))


def test_uncached_cell_names_file_and_fetch_command(repo, tmp_path):
    matrix = load_matrix(repo / "kernels")
    images = OpenWrtImages(Cache(tmp_path), repo / "images", mirror="http://mirror.invalid")
    why = images.missing(matrix.get("openwrt-24.10-x86-64"), "kmodtest fetch openwrt-24.10-x86-64")
    assert why == (
        "OpenWrt image openwrt-24.10.5-x86-64-generic-ext4-combined.img.gz is not in the cache "
        f"({tmp_path}); fix: kmodtest fetch openwrt-24.10-x86-64"
    )
    [artifact] = images.artifacts(matrix.get("openwrt-24.10-x86-64"))
    assert artifact.url.startswith("http://mirror.invalid/releases/24.10.5/targets/x86/64/")


def test_local_build_missing_file_is_a_skip_reason(tmp_path):
    path = tmp_path / "openwrt-x86-64-generic-ext4-combined.img.gz"
    cell = (
        "  - id: o\n    arch: x86_64\n    source: {kind: openwrt, target: x86/64, kernel: 6.6.119,"
        f" files: {{combined: {{path: {path}, sha256: {'a' * 64}}}}}}}\n"
    )
    matrix = load_matrix(write(tmp_path, cell))
    images = OpenWrtImages(Cache(tmp_path / "c"), tmp_path)
    why = images.missing(matrix.get("o"), "kmodtest fetch o")
    assert why == f"local OpenWrt image {path} (role combined) does not exist"


def test_offload_package_is_read_from_opkg_and_apk_databases():
    from kmodtest.prepare.openwrt import installed_package

    opkg = (
        "Package: kmod-nf-flow\nVersion: 6.6.119-r1\nStatus: install user installed\n\n"
        "Package: kmod-nft-offload\nVersion: 6.6.119-r1\nDepends: kernel, kmod-nf-flow\n"
    )
    apk = "P:kmod-nf-flow\nV:6.12.94-r1\n\nP:kmod-nft-offload\nV:6.12.94-r1\nA:x86_64\n"
    assert installed_package(opkg, "opkg", "kmod-nft-offload").version == "6.6.119-r1"
    assert installed_package(apk, "apk", "kmod-nft-offload").version == "6.12.94-r1"
    assert installed_package(opkg, "opkg", "kmod-veth") is None
    assert installed_package(apk, "apk", "kmod-nf") is None  # whole names only


def test_validate_on_an_openwrt_cell_says_how_its_users_validate(repo):
    """`kmodtest validate` builds no module overlay for OpenWrt: its verdict names the SDK
    package route (--openwrt-package), and a table of only such cells exits non-zero."""
    from kmodtest.face.validate import CellVerdict, _prebuild, exit_code

    cell = load_matrix(repo / "kernels").get("openwrt-24.10-x86-64")
    verdict = CellVerdict(cell.id)
    assert not _prebuild(cell, None, None, verdict)  # type: ignore[arg-type]  # never reached
    assert verdict.verdict == "SKIP"
    assert "OpenWrt SDK" in verdict.problem
    assert f"--kernel {cell.id} --openwrt-package" in verdict.problem
    assert exit_code([verdict]) != 0
