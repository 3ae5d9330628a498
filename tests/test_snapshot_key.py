"""What a saved VM state is keyed by, without booting anything: the machine, not its paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kmodtest.arches import ARCHES
from kmodtest.guest.router import OneVmNetwork
from kmodtest.guest.topology import Topology
from kmodtest.lifecycle.snapshots import Snapshots, machine_description
from kmodtest.prepare.cache import Cache
from kmodtest.run.machine import MachineSpec


def spec(run: Path, logs: Path, name: str = "cell-e1000", **kw: object) -> MachineSpec:
    fields = dict(
        name=name, arch=ARCHES["x86_64"], machine="pc", cpu="max", memory_mb=512,
        kernel=Path("/cache/images/k1/kernel"), initrd=Path("/cache/images/k1/initrd.cpio"),
        cmdline="console=ttyS0", run_dir=run, log_dir=logs, nics=Topology("e1000").nics(run),
    )  # fmt: skip
    fields.update(kw)
    return MachineSpec(**fields)  # type: ignore[arg-type]


def test_two_vms_of_a_case_share_a_key_whatever_their_paths(tmp_path):
    snapshots, network = Snapshots(Cache(tmp_path)), OneVmNetwork(Topology("e1000"))
    a = spec(Path("/tmp/kt-a,1"), tmp_path / "boot1")
    b = spec(Path("/tmp/kt-b"), tmp_path / "boot2")
    assert machine_description(a) == machine_description(b)
    assert "{run}" in " ".join(machine_description(a))
    assert snapshots.key(a, network) == snapshots.key(b, network)


def test_the_key_changes_with_the_machine_the_image_and_the_network(tmp_path):
    snapshots, network = Snapshots(Cache(tmp_path)), OneVmNetwork(Topology("e1000"))
    base = spec(Path("/tmp/kt-a"), tmp_path)
    key = snapshots.key(base, network)
    others = [
        dataclasses.replace(base, memory_mb=1024),
        dataclasses.replace(base, initrd=Path("/cache/images/k2/initrd.cpio")),
        dataclasses.replace(base, cmdline="console=ttyS0 quiet"),
        dataclasses.replace(base, accel="kvm"),
        dataclasses.replace(base, smp=2),
    ]
    assert len({key, *(snapshots.key(o, network) for o in others)}) == 1 + len(others)
    assert snapshots.key(base, OneVmNetwork(Topology("virtio-net-pci"))) != key
