"""The machine description turns into the QEMU argv we expect, without booting anything."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kmodtest.arches import ARCHES
from kmodtest.errors import MachineError
from kmodtest.guest.topology import Topology
from kmodtest.run.disks import overlay
from kmodtest.run.machine import Disk, MachineSpec
from kmodtest.run.qemu import QemuProcess, qemu_argv

# the golden argv starts with the host QEMU's name, whichever QEMU this run chose
pytestmark = pytest.mark.usefixtures("host_qemu")


def spec(tmp_path: Path, arch: str = "x86_64", accel: str = "tcg", **kw) -> MachineSpec:
    run = Path("/tmp/kt-x")
    fields = {
        "kernel": Path("/img/kernel"),
        "initrd": Path("/img/initrd.cpio"),
        "cmdline": "console=ttyS0",
        "nics": Topology("e1000").nics(run),
        **kw,
    }
    return MachineSpec(
        name="vm",
        arch=ARCHES[arch],
        machine=ARCHES[arch].machine,
        cpu=ARCHES[arch].cpu,
        memory_mb=512,
        run_dir=run,
        log_dir=tmp_path,
        accel=accel,
        **fields,
    )


def test_x86_argv_golden(tmp_path):
    argv = qemu_argv(spec(tmp_path))
    assert argv[:24] == [
        "qemu-system-x86_64", "-name", "vm", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-machine", "pc", "-accel", "tcg", "-cpu", "max",
        "-smp", "1", "-m", "512", "-kernel", "/img/kernel", "-append", "console=ttyS0",
        "-initrd", "/img/initrd.cpio",
    ]  # fmt: skip
    joined = " ".join(argv)
    assert f"file,id=console,path={tmp_path}/console.log" in joined
    assert "socket,id=agent,path=/tmp/kt-x/agent.sock,server=on,wait=off" in joined
    assert "virtserialport,bus=vser0.0,chardev=agent,name=org.kmodtest.agent" in joined
    assert "-icount" not in argv


def test_nics_are_wired_in_crossed_pairs(tmp_path):
    argv = qemu_argv(spec(tmp_path))
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    all_devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    devices = [d for d in all_devices if "netdev=" in d]
    assert len(netdevs) == 4 and len(devices) == 4
    assert all(d.startswith("e1000,") and d.endswith(",romfile=") for d in devices)
    lan_router = "dgram,id=lan,local.type=unix,local.path=/tmp/kt-x/lan-r.sock,"
    lan_client = "dgram,id=lan-client,local.type=unix,local.path=/tmp/kt-x/lan-e.sock,"
    assert netdevs[0].startswith(lan_router) and netdevs[0].endswith("/tmp/kt-x/lan-e.sock")
    assert netdevs[1].startswith(lan_client) and netdevs[1].endswith("/tmp/kt-x/lan-r.sock")
    macs = [d.split("mac=")[1].split(",")[0] for d in devices]
    assert len(set(macs)) == 4


def test_igbs_get_slots_two_apart_and_other_models_qemus_next(tmp_path):
    """igb's SR-IOV virtual functions sit 16-17 slots above it: neighbouring igbs collide."""
    igb = qemu_argv(spec(tmp_path, nics=Topology("igb").nics(Path("/tmp/kt-x"))))
    assert [a.rsplit(",", 1)[1] for a in igb if a.startswith("igb,")] == [
        "addr=0x3", "addr=0x5", "addr=0x7", "addr=0x9",
    ]  # fmt: skip
    assert not [a for a in qemu_argv(spec(tmp_path)) if a.startswith("e1000,") and "addr=" in a]


def test_kvm_uses_host_cpu_and_icount_only_under_tcg(tmp_path):
    assert qemu_argv(spec(tmp_path, accel="kvm", icount=True))[12:14] == ["-cpu", "host"]
    assert "-icount" not in qemu_argv(spec(tmp_path, accel="kvm", icount=True))
    assert "shift=0,sleep=off" in qemu_argv(spec(tmp_path, icount=True))


def test_more_than_one_cpu_asks_for_multi_threaded_tcg_except_under_icount(tmp_path):
    def accel_and_smp(**kw: object) -> list[str]:
        argv = qemu_argv(spec(tmp_path, **kw))
        return [argv[argv.index("-accel") + 1], argv[argv.index("-smp") + 1]]

    assert accel_and_smp(smp=2) == ["tcg,thread=multi", "2"]
    assert accel_and_smp(smp=1) == ["tcg", "1"]
    assert accel_and_smp(smp=2, icount=True) == ["tcg", "2"]  # -icount needs one TCG thread
    assert accel_and_smp(smp=2, accel="kvm") == ["kvm", "2"]


def test_arm64_uses_its_own_binary_machine_and_console(tmp_path):
    argv = qemu_argv(spec(tmp_path, arch="arm64"))
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1].startswith("virt")


def test_missing_qemu_binary_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MachineError) as err:
        QemuProcess.start(spec(tmp_path, arch="arm64"))
    assert "qemu-system-aarch64 is not installed" in str(err.value)
    assert "apt-get install qemu-system-arm" in str(err.value)


def test_a_restore_loads_the_state_from_the_inherited_fd_and_waits_paused(tmp_path):
    booted, restored = qemu_argv(spec(tmp_path)), qemu_argv(spec(tmp_path), incoming_fd=7)
    assert restored == [*booted, "-S", "-incoming", "fd:7"]  # the same devices, or no load


def test_firmware_boot_from_a_disk_overlay_has_no_kernel(tmp_path):
    disk = Disk(Path("/tmp/kt-x/disk0.qcow2"))
    s = spec(tmp_path, kernel=None, initrd=None, cmdline=None, disks=(disk,), console_input=True)
    argv = qemu_argv(s)
    assert "-kernel" not in argv and "-append" not in argv and "-initrd" not in argv
    assert argv[argv.index("-drive") + 1] == (
        "file=/tmp/kt-x/disk0.qcow2,format=qcow2,if=virtio,index=0"
    )
    assert argv[argv.index("-chardev") + 1] == (
        "socket,id=console,path=/tmp/kt-x/console.sock,server=on,wait=off,"
        f"logfile={tmp_path}/console.log"
    )
    assert argv[argv.index("-chardev") + 3] == "chardev:console"


def test_direct_boot_with_disk_and_bios(tmp_path):
    s = spec(
        tmp_path,
        initrd=None,
        cmdline="root=PARTUUID=6b6d7464-02 rootwait console=ttyS0,115200n8 noinitrd",
        disks=(Disk(Path("/d.qcow2")),),
        firmware=Path("/fw/bios.bin"),
    )
    argv = qemu_argv(s)
    i = argv.index("-bios")
    assert argv[i : i + 6] == [
        "-bios", "/fw/bios.bin", "-kernel", "/img/kernel",
        "-append", "root=PARTUUID=6b6d7464-02 rootwait console=ttyS0,115200n8 noinitrd",
    ]  # fmt: skip
    assert "file=/d.qcow2,format=qcow2,if=virtio,index=0" in argv


def test_kernel_without_cmdline_gets_no_append(tmp_path):
    argv = qemu_argv(spec(tmp_path, arch="arm64", initrd=None, cmdline=None))
    assert argv[argv.index("-kernel") + 1] == "/img/kernel"
    assert "-append" not in argv


def test_overlay_reads_through_and_keeps_the_base_untouched(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(b"A" * 65536)
    disk = overlay(base, tmp_path / "run" / "disk0.qcow2")
    assert disk.format == "qcow2"
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk.path)], capture_output=True, text=True
    )
    data = json.loads(info.stdout)
    assert data["format"] == "qcow2"
    assert data["backing-filename"] == str(base)
    assert data["backing-filename-format"] == "raw"
    assert base.read_bytes() == b"A" * 65536
