"""Passthrough NICs: the QEMU argv, the prerequisite checks (against this host's real sysfs and
against made-up trees for the cases this host cannot show), and the skip a passthrough case
gets here (no IOMMU, no spare NIC)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmodtest.arches import ARCHES
from kmodtest.errors import ConfigError
from kmodtest.face.plugin import passthrough_option
from kmodtest.guest.topology import Topology
from kmodtest.prepare.cells import pci_address
from kmodtest.run.machine import MachineSpec
from kmodtest.run.passthrough import missing_guest_driver, missing_prerequisites
from kmodtest.run.qemu import qemu_argv

PORTS = {
    "lan": "0000:03:00.0",
    "client": "0000:03:00.1",
    "wan": "0000:04:00.0",
    "server": "0000:04:00.1",
}
OPTION = ",".join(f"{k}={v}" for k, v in PORTS.items())


def test_qemu_argv_passes_host_functions_through_at_pinned_slots(tmp_path):
    run = Path("/tmp/kt-x")
    spec = MachineSpec(
        name="vm", arch=ARCHES["x86_64"], machine="pc", cpu="max", memory_mb=512,
        kernel=Path("/k"), initrd=None, cmdline="", run_dir=run, log_dir=tmp_path,
        nics=Topology("vfio-pci", passthrough=PORTS).nics(run),
    )  # fmt: skip
    argv = qemu_argv(spec)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert [d for d in devices if d.startswith("vfio-pci")] == [
        "vfio-pci,host=0000:03:00.0,id=lan,addr=0x10",
        "vfio-pci,host=0000:03:00.1,id=client,addr=0x11",
        "vfio-pci,host=0000:04:00.0,id=wan,addr=0x12",
        "vfio-pci,host=0000:04:00.1,id=server,addr=0x13",
    ]
    assert "-netdev" not in argv


def test_pci_addresses_are_normalised_and_bad_ones_named():
    assert pci_address("03:00.1") == "0000:03:00.1"
    assert pci_address("0000:AF:1f.7") == "0000:af:1f.7"
    with pytest.raises(ValueError, match="not a PCI address"):
        pci_address("eth0")
    with pytest.raises(ConfigError, match="name all four ports"):
        passthrough_option("lan=0000:03:00.0,wan=0000:04:00.0")
    assert passthrough_option(OPTION).by_port() == PORTS


def test_this_hosts_real_state_is_reported():
    """Against the real /sys: an IOMMU that is off and addresses that do not exist say so."""
    problems = missing_prerequisites(PORTS.values(), "libvirt")
    groups = Path("/sys/kernel/iommu_groups")
    iommu_off = not groups.is_dir() or not any(groups.iterdir())
    assert any("IOMMU is off" in p for p in problems) == iommu_off, problems
    for address in PORTS.values():
        if not Path("/sys/bus/pci/devices", address).exists():
            assert f"no PCI device {address} on this host (lspci -D lists them)" in problems


def fake_host(root: Path, *, bound: str = "vfio-pci", neighbour: str | None = None) -> None:
    """A sysfs/dev tree: the four ports in IOMMU groups 7 (03:00.x) and 8 (04:00.x)."""
    pci = root / "sys/bus/pci/devices"
    drivers = root / "sys/bus/pci/drivers"
    (drivers / "vfio-pci").mkdir(parents=True)
    devices = dict(PORTS)
    if neighbour:
        devices["neighbour"] = "0000:03:00.2"
    for address in devices.values():
        group = "7" if address.startswith("0000:03") else "8"
        dev = pci / address
        dev.mkdir(parents=True)
        (dev / "class").write_text("0x020000\n")
        (dev / "vendor").write_text("0x15b3\n")
        (dev / "device").write_text("0x1015\n")
        (dev / "modalias").write_text("pci:v000015B3d00001015sv*\n")
        driver = neighbour if address == "0000:03:00.2" else bound
        (drivers / driver).mkdir(exist_ok=True)
        os.symlink(drivers / driver, dev / "driver")
        members = root / "sys/kernel/iommu_groups" / group / "devices"
        members.mkdir(parents=True, exist_ok=True)
        os.symlink(dev, members / address)
        os.symlink(members.parent, dev / "iommu_group")
        vfio = root / "dev/vfio" / group
        vfio.parent.mkdir(parents=True, exist_ok=True)
        vfio.touch()


def test_a_ready_host_has_no_missing_prerequisite(tmp_path):
    fake_host(tmp_path)
    assert missing_prerequisites(PORTS.values(), "qemu", tmp_path) == []
    assert missing_prerequisites(PORTS.values(), "libvirt", tmp_path) == []


def test_a_group_neighbour_on_a_host_driver_is_named(tmp_path):
    fake_host(tmp_path, neighbour="mlx5_core")
    problems = missing_prerequisites(PORTS.values(), "libvirt", tmp_path)
    assert problems == [
        "IOMMU group 7 of 0000:03:00.0 also holds 0000:03:00.2 (driver mlx5_core): "
        "pass it through too, or bind it to vfio-pci",
        "IOMMU group 7 of 0000:03:00.1 also holds 0000:03:00.2 (driver mlx5_core): "
        "pass it through too, or bind it to vfio-pci",
    ]


def test_qemu_backend_needs_vfio_pci_bound_libvirt_rebinds_itself(tmp_path):
    fake_host(tmp_path, bound="mlx5_core")
    assert missing_prerequisites(PORTS.values(), "libvirt", tmp_path) == []
    problems = missing_prerequisites(["0000:03:00.0", "0000:03:00.1"], "qemu", tmp_path)
    assert len(problems) == 2
    assert "0000:03:00.0 is bound to mlx5_core, not vfio-pci" in problems[0]
    assert "echo vfio-pci > /sys/bus/pci/devices/0000:03:00.0/driver_override" in problems[0]


def test_guest_image_without_the_driver_is_named(tmp_path):
    fake_host(tmp_path, bound="mlx5_core")
    why = missing_guest_driver(PORTS, ["virtio_net", "e1000"], tmp_path)
    assert why is not None and "no mlx5_core module for lan port 0000:03:00.0 (15b3:1015)" in why
    assert missing_guest_driver(PORTS, ["mlx5_core", "virtio_net"], tmp_path) is None


def test_passthrough_case_skips_here_naming_what_is_missing(pytester, repo, inner_env):
    from kmodtest.prepare.cache import default_cache_dir

    """The real [HW_OFFLOAD] test on a passthrough case: this host cannot, and says why."""
    if any(Path("/sys/kernel/iommu_groups").glob("*")):
        pytest.skip("this host has an IOMMU: the skip reason differs (see the fake-tree tests)")
    result = pytester.runpytest_subprocess(
        str(repo / "vmtests/test_offload_flags.py"), "-p", "fixtures.router",
        f"--kernels-dir={repo / 'kernels'}", f"--images-dir={repo / 'images'}",
        f"--image-cache={default_cache_dir()}", "--nic", "vfio-pci", "--passthrough", OPTION,
        "-rs", "-k", "test_hw_offload_on_passthrough_nic",
    )  # fmt: skip
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*SKIPPED*passthrough (qemu backend) not possible here: the host IOMMU is off*",
        ]
    )
    assert "no PCI device 0000:03:00.0 on this host" in result.stdout.str()
