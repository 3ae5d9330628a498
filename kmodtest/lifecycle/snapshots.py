"""Saved lab states: a VM case boots cold once, and later VMs of the case start from its state.

After a cold boot has brought the network up and its boot window was found healthy, the
guest's whole state (QEMU migration stream) is saved into the cache, keyed by
:func:`~kmodtest.prepare.keys.artifact_key` over what decides that state: QEMU's command line
(with the per-VM paths taken out; the image's kernel and initrd paths carry the image's own
key), the QEMU version, the network set-up script, and the code that saves and restores. The
entry is built under the cache lock and published atomically only after a second QEMU restored
it, answered, and reported the same addresses and namespaces as the VM it was saved from.
Every later VM of the case (the next run, another xdist worker, the replacement after a
kernel problem) is restored from it instead of booting.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.errors import MachineError
from kmodtest.guest.boot import connect_restored
from kmodtest.guest.router import Network
from kmodtest.guest.vm import GuestVM
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.keys import artifact_key
from kmodtest.run.devices import qemu_version_line
from kmodtest.run.launcher import SavableMachine, SnapshotLauncher
from kmodtest.run.machine import MachineSpec
from kmodtest.run.qemu import find_qemu, option_path, qemu_argv
from kmodtest.run.rundirs import new_lab_dir

log = logging.getLogger(__name__)

KIND = "snapshots"  # the cache directory
STATE = "state"  # the migration stream inside an entry
META = "snapshot.json"
CODE = (
    "kmodtest.lifecycle.snapshots",
    "kmodtest.run.snapshot",
    "kmodtest.run.qemu",
    "kmodtest.guest.boot",
)
# what the verification compares between the saved VM and its restored copy
FINGERPRINT = (
    "ip -br addr; ip route; for n in $(ip netns list | cut -d' ' -f1); do "
    'echo "netns $n"; ip -n "$n" -br addr; ip -n "$n" route; done'
)


def machine_description(spec: MachineSpec) -> list[str]:
    """QEMU's argv for ``spec`` with what differs between two VMs of a case (name, sockets,
    logs) replaced by placeholders: what a saved state must match to be loaded."""
    argv = qemu_argv(spec, find_qemu(spec))
    replace = [(option_path(spec.run_dir), "{run}"), (str(spec.run_dir), "{run}"),
               (option_path(spec.log_dir), "{log}"), (str(spec.log_dir), "{log}")]  # fmt: skip
    out = []
    for arg in argv:
        for old, new in replace:
            arg = arg.replace(old, new)
        out.append("{name}" if arg == spec.name else arg)
    return out


def _setup_script(network: Network) -> str:
    return network.topology.setup_script()


@dataclass
class Snapshots:
    cache: Cache
    failed: dict[str, str] = field(default_factory=dict)  # key -> why it could not be saved

    def key(self, spec: MachineSpec, network: Network) -> str:
        inputs = {
            "machine": machine_description(spec),
            "qemu": qemu_version_line(find_qemu(spec)),
            "network": _setup_script(network),
        }
        return artifact_key(inputs, CODE)

    def state(self, key: str) -> Path | None:
        """The published state of ``key``, if there is one."""
        path = self.cache.path(KIND, key) / STATE
        return path if path.is_file() else None

    def save(
        self, key: str, machine: SavableMachine, launcher: SnapshotLauncher,
        scratch_spec: Callable[[Path], MachineSpec], fingerprint: str, timeout: float,
    ) -> Path:  # fmt: skip
        """Save ``machine`` (running, network configured, healthy) as ``key``'s entry.

        ``scratch_spec(run_dir)`` describes a VM of the same case with its own sockets, for
        the verification restore; ``fingerprint`` is :data:`FINGERPRINT`'s output on
        ``machine``, which the restored copy must repeat."""

        def build(tmp: Path) -> None:
            start = time.monotonic()
            machine.save(tmp / STATE)
            saved = time.monotonic() - start
            restore = _verify(tmp / STATE, launcher, scratch_spec, fingerprint, timeout)
            meta = {
                "key": key,
                "machine": machine_description(machine.spec),
                "qemu": qemu_version_line(find_qemu(machine.spec)),
                "bytes": (tmp / STATE).stat().st_size,
                "save_seconds": round(saved, 3),
                "verify_restore_seconds": round(restore, 3),
            }
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")

        try:
            return self.cache.get_or_build(KIND, key, build) / STATE
        except MachineError as exc:
            self.failed[key] = exc.problem
            raise


def _verify(
    state: Path, launcher: SnapshotLauncher, scratch_spec: Callable[[Path], MachineSpec],
    fingerprint: str, timeout: float,
) -> float:  # fmt: skip
    """Restore ``state`` into a scratch VM: it must answer, repeat ``fingerprint`` and show no
    kernel problem. Returns restore-to-first-command in seconds."""
    run_dir = new_lab_dir()
    spec = scratch_spec(run_dir)
    try:
        start = time.monotonic()
        machine = launcher.restore(spec, state)
        guest = None
        try:
            channel = connect_restored(machine, timeout)
            seconds = time.monotonic() - start
            guest = GuestVM.connected(spec, machine, channel, seconds)
            got = guest.check(FINGERPRINT)
        finally:
            problem = guest.stop() if guest is not None else None
            machine.stop()
        if got != fingerprint:
            raise MachineError(
                f"{spec.name}: the restored state shows another network than the saved VM\n"
                f"saved:\n{fingerprint}\nrestored:\n{got}"
            )
        if problem is not None:
            raise MachineError(f"{spec.name}: the restored kernel reported a problem\n{problem}")
        return seconds
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
