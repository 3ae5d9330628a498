"""Saving and restoring a VM's state through QMP, against a real QEMU that runs no guest
(``-machine none``: no firmware, no kernel, nothing to boot, so no VM slot is needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from kmodtest import processes
from kmodtest.arches import ARCHES
from kmodtest.errors import MachineError
from kmodtest.run.machine import MachineSpec
from kmodtest.run.snapshot import resume_restored, save_state

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def _spec(tmp_path: Path, name: str) -> MachineSpec:
    run = tmp_path / name
    run.mkdir()
    return MachineSpec(
        name=name, arch=ARCHES["x86_64"], machine="none", cpu="max", memory_mb=16, kernel=None,
        initrd=None, cmdline=None, run_dir=run, log_dir=run,
    )  # fmt: skip


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    """Start QEMU, without a guest, on a spec's QMP socket; stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def _start(spec: MachineSpec, *extra: str, **kwargs: object) -> subprocess.Popen[bytes]:
        argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-m", "16"]
        argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off", *extra]
        proc = processes.spawn(argv, stdin=subprocess.DEVNULL, **kwargs)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        processes.terminate(proc)


def _status(spec: MachineSpec) -> str:
    monitor = QEMUMonitorProtocol(str(spec.qmp_socket))
    monitor.connect()
    try:
        return monitor.cmd("query-status")["status"]
    finally:
        monitor.close()


def test_a_saved_state_loads_into_a_fresh_qemu_which_then_runs(tmp_path: Path, start) -> None:
    saved, restored = _spec(tmp_path, "saved"), _spec(tmp_path, "restored")
    start(saved)
    state = tmp_path / "state"
    save_state(saved, state)  # polls query-migrate until "completed"
    assert state.stat().st_size > 0 and _status(saved) == "running"
    fd = os.open(state, os.O_RDONLY)
    try:
        proc = start(restored, "-S", "-incoming", f"fd:{fd}", pass_fds=(fd,))
    finally:
        os.close(fd)
    resume_restored(restored, lambda: proc.poll() is None)  # polls query-status to "paused"
    assert _status(restored) == "running"


def test_a_save_that_cannot_write_names_the_failed_migration(tmp_path: Path, start) -> None:
    """/dev/full: every write fails, so query-migrate reports "failed"; the VM runs on."""
    spec = _spec(tmp_path, "full")
    start(spec)
    with pytest.raises(MachineError, match=r"full: saving its state ended in state 'failed'"):
        save_state(spec, Path("/dev/full"))
    assert _status(spec) == "running"
