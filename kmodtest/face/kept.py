"""VMs kept running after a test run (``--keep-vm-on-failure``): one record each, in a state
directory, so ``kmodtest ps``, ``attach`` and ``stop`` find them from any terminal.

A record names QEMU's pid *and its start time* (``/proc/<pid>/stat``), so a pid the kernel gave
to another process since is never mistaken for the VM, and stopping never kills a stranger.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kmodtest.errors import ConfigError, MachineError
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.run.qmp import Qmp
from kmodtest.run.rundirs import keep_lab_dir, release_lab_dir


def state_dir() -> Path:
    """``$KMODTEST_STATE``, else ``$XDG_STATE_HOME/kmodtest``, else ``~/.local/state/kmodtest``."""
    if env := os.environ.get("KMODTEST_STATE"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "kmodtest"


def vms_dir() -> Path:
    return state_dir() / "vms"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat);
    None when there is no such process or it is a zombie (it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


@dataclass(frozen=True)
class KeptVm:
    id: str
    pid: int
    pid_start: int
    name: str  # the lab: cell and NIC model
    test: str  # the failing test's id
    kernel: str
    agent_socket: str
    qmp_socket: str
    lab_dir: str  # the sockets' directory (in its run's root), removed by `kmodtest stop`
    console_log: str
    kept_at: float

    @property
    def alive(self) -> bool:
        return start_time(self.pid) == self.pid_start

    def save(self) -> Path:
        path = vms_dir() / f"{self.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> KeptVm:
        return cls(**json.loads(path.read_text()))

    def stop(self) -> None:
        """QEMU quits (asked through QMP, else killed); its sockets and record go."""
        if self.alive:
            try:
                with Qmp(Path(self.qmp_socket), timeout=5) as qmp:
                    qmp.execute("quit")
            except (MachineError, OSError):
                pass
            deadline = time.monotonic() + 5
            while self.alive and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.alive:
                os.kill(self.pid, signal.SIGKILL)
        release_lab_dir(Path(self.lab_dir))
        (vms_dir() / f"{self.id}.json").unlink(missing_ok=True)


def kept_vms() -> list[KeptVm]:
    """Every record, oldest first; records of VMs that are gone are removed (and not listed)."""
    found = []
    for path in sorted(vms_dir().glob("*.json")):
        vm = KeptVm.load(path)
        if vm.alive:
            found.append(vm)
        else:
            vm.stop()  # only cleans up: the pid is not the VM's any more
    return sorted(found, key=lambda v: v.kept_at)


def find(vm_id: str) -> KeptVm:
    vms = kept_vms()
    matches = [v for v in vms if v.id == vm_id] or [v for v in vms if v.id.startswith(vm_id)]
    if len(matches) != 1:
        known = ", ".join(v.id for v in vms) or "none"
        what = "no kept VM" if not matches else "more than one kept VM"
        raise ConfigError(f"{what} matches {vm_id!r} (kept: {known})", "see `kmodtest ps`")
    return matches[0]


def keep_lab(pool: RouterPool, case: VmCase, test: str) -> KeptVm | None:
    """Leave the case's running router as the test left it and record it; None when there is
    none to keep (no lab running, or a launcher whose VMs cannot outlive the run)."""
    handed = pool.keep(case)
    if handed is None:
        return None
    router, machines, lab_dir = handed
    detach = getattr(router.vm.machine, "detach", None)
    if detach is None or len(machines) != 1:
        for machine in machines:
            machine.stop()
        return None
    pid = detach()
    keep_lab_dir(lab_dir)
    vm = KeptVm(
        id=f"{router.name}-{pid}", pid=pid, pid_start=start_time(pid) or 0, name=router.name,
        test=test, kernel=router.image.kernel_version,
        agent_socket=str(router.spec.agent_socket), qmp_socket=str(router.spec.qmp_socket),
        lab_dir=str(lab_dir), console_log=str(router.console_log), kept_at=time.time(),
    )  # fmt: skip
    vm.save()
    return vm
