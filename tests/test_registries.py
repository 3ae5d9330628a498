"""A new arch or NIC model is one record in one place (kmodtest/arches.py, kmodtest/nics.py).

Each test adds a fake record there, and only there, and follows it through everything that
used to switch on the name: cell validation and selection, the machine description and QEMU's
command line, the kernel command line, the kconfig fragment, the image's module list, the
accelerator choice and the test network's scripts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtest.arches import ARCHES, Arch, KernelBuild
from kmodtest.errors import ConfigError
from kmodtest.guest.boot import DirectBoot
from kmodtest.guest.topology import Topology
from kmodtest.nics import NICS, NicModel
from kmodtest.prepare.cells import Cell, load_matrix
from kmodtest.prepare.images import Image, image_modules
from kmodtest.prepare.kconfig import fragment
from kmodtest.prepare.recipes import load_recipe
from kmodtest.run.accel import choose_accel
from kmodtest.run.qemu import qemu_argv

FAKE_NIC = NicModel(
    "fake-nic", "fake_drv", ("CONFIG_FAKE_VENDOR=y", "CONFIG_FAKE_DRV=m"),
    optional=True, link_options="gso_max_segs 7",
)  # fmt: skip
FAKE_ARCH = Arch(
    name="riscv64", debian="riscv64", qemu_binary="qemu-system-riscv64",
    qemu_package="qemu-system-misc", machine="virt", cpu="rv64", console="ttyS9",
    kbuild=KernelBuild(karch="riscv", image="Image", kconfig=("CONFIG_FAKE_ARCH_SERIAL=y",),
                       triplet="riscv64-linux-gnu", cross=True),
    uname=("riscv64",), kvm_hosts=("riscv64",),
)  # fmt: skip


def _matrix(tmp_path: Path, arch: str, nics: str):
    (tmp_path / "m.yaml").write_text(
        "cells:\n  - id: fake-cell\n"
        f"    arch: {arch}\n"
        "    source: {kind: debian, suite: trixie, kernel_package: linux-image-fake}\n"
        f"    nics: [{nics}]\n    default: true\n"
    )
    return load_matrix(tmp_path)


def _argv(cell: Cell, nic: str, tmp_path: Path) -> list[str]:
    run_dir = tmp_path / "run"
    image = Image(tmp_path / "image")
    spec = DirectBoot().machine_spec(
        "vm", cell, image, Topology(nic).nics(run_dir), run_dir, tmp_path, "tcg", False
    )
    return qemu_argv(spec)


def test_a_new_nic_model_is_one_record(monkeypatch, tmp_path, repo):
    with pytest.raises(ConfigError, match="unknown NIC model"):
        _matrix(tmp_path, "x86_64", "fake-nic")
    monkeypatch.setitem(NICS, FAKE_NIC.model, FAKE_NIC)

    matrix = _matrix(tmp_path, "x86_64", "virtio-net-pci, fake-nic")
    [cell] = matrix.select(None, nics="fake-nic")
    argv = _argv(cell, "fake-nic", tmp_path)
    assert sum(a.startswith("fake-nic,netdev=") for a in argv) == 4  # lan, wan and both ends

    setup, reset = Topology("fake-nic").setup_script(), Topology("fake-nic").reset_script()
    assert "modprobe fake_drv" in setup
    assert "mtu 1500 gso_max_segs 7 up" in reset

    required, optional = image_modules(load_recipe(repo / "images", "debian-router"))
    assert "fake_drv" in optional and "fake_drv" not in required
    assert "CONFIG_FAKE_DRV=m" in fragment("x86_64").splitlines()


def test_a_new_arch_is_one_record(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="unknown arch 'riscv64'"):
        _matrix(tmp_path, "riscv64", "virtio-net-pci")
    monkeypatch.setitem(ARCHES, FAKE_ARCH.name, FAKE_ARCH)

    matrix = _matrix(tmp_path, "riscv64", "virtio-net-pci")
    [cell] = matrix.select("all", arches="riscv64")
    argv = _argv(cell, "virtio-net-pci", tmp_path)
    assert argv[0] == "qemu-system-riscv64"
    assert argv[argv.index("-machine") + 1] == "virt"
    assert argv[argv.index("-cpu") + 1] == "rv64"
    assert argv[argv.index("-append") + 1].startswith("console=ttyS9 ")

    assert "CONFIG_FAKE_ARCH_SERIAL=y" in fragment("riscv64").splitlines()
    assert "CONFIG_64BIT=y" not in fragment("riscv64")  # x86's own lines stay x86's
    choice = choose_accel(FAKE_ARCH, "auto")
    assert choice.accel == "tcg" and "differs from host" in choice.reason
