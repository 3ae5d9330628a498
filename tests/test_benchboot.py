"""``bench-boot``'s virtme-ng comparison says why it cannot be made, before running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtest.face import benchboot
from kmodtest.face.benchboot import VngFailed, vng_kernel
from kmodtest.prepare.cells import load_matrix


def _cell(repo: Path, cell_id: str):
    return load_matrix(repo / "kernels").get(cell_id)


def test_a_cell_without_a_debian_kernel_package_is_not_compared(repo: Path):
    with pytest.raises(VngFailed, match="Debian cells only"):
        vng_kernel(_cell(repo, "openwrt-24.10-x86-64"), None, None)  # type: ignore[arg-type]


def test_a_foreign_arch_is_not_compared(repo: Path):
    with pytest.raises(VngFailed, match="host's arch only, not arm64"):
        vng_kernel(_cell(repo, "debian-trixie-arm64"), None, None)  # type: ignore[arg-type]


def test_a_host_without_udevd_is_named_before_vng_runs(repo: Path, monkeypatch, tmp_path):
    """Without systemd-udevd the guest runs the command, and vng exits 255 all the same."""
    monkeypatch.setattr(benchboot, "UDEVD", (tmp_path / "no-udevd",))
    with pytest.raises(VngFailed, match=r"systemd-udevd.*fix: install udev"):
        vng_kernel(_cell(repo, "debian-trixie-amd64"), None, None)  # type: ignore[arg-type]
