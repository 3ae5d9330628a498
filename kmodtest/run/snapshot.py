"""A running QEMU's whole state to a file, and back into a fresh QEMU (QMP, migration over fds).

Saving pauses the guest, streams its state with ``migrate fd:`` into a file QEMU receives over
the QMP socket (SCM_RIGHTS, so no path ever passes through a shell), and resumes it. Restoring
starts QEMU with the same devices plus ``-S -incoming fd:N`` (the file as an inherited fd):
it loads the state and stays paused, so the caller can connect the agent socket *before* the
guest runs again. That order matters: virtio-serial tells the guest about a host side that
is not connected when the guest resumes, and the agent would read end-of-file and restart.
Backends (chardev files, unix sockets, dgram links) are not part of the state, so a restored
VM gets its own sockets and console file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from kmodtest.errors import MachineError
from kmodtest.run.machine import MachineSpec

QMP_CONNECT_TIMEOUT = 30.0
SAVE_TIMEOUT = 120.0
MAX_BANDWIDTH = 1 << 40  # bytes/s: QEMU's default (32 MiB/s) would throttle a local file


def _monitor(spec: MachineSpec, alive: Callable[[], bool] | None = None) -> QEMUMonitorProtocol:
    """A QMP connection to ``spec``'s QEMU, retried until its socket answers."""
    deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
    while True:
        monitor = QEMUMonitorProtocol(str(spec.qmp_socket))
        try:
            monitor.connect()
            monitor.settimeout(SAVE_TIMEOUT)
            return monitor
        except Exception as exc:  # socket errors, and qemu.qmp's own types wrapping them
            monitor.close()
            if alive is not None and not alive():
                raise MachineError(
                    f"{spec.name}: QEMU exited before its QMP socket answered"
                ) from None
            if time.monotonic() > deadline:
                raise MachineError(f"{spec.name}: QMP socket {spec.qmp_socket}: {exc}") from None
            time.sleep(0.01)


def _cmd(monitor: QEMUMonitorProtocol, spec: MachineSpec, name: str, **args: object) -> object:
    try:
        return monitor.cmd(name, **args)
    except Exception as exc:  # QMP error replies carry QEMU's own message
        raise MachineError(f"{spec.name}: QMP {name} failed: {exc}") from None


def save_state(spec: MachineSpec, path: Path, timeout: float = SAVE_TIMEOUT) -> None:
    """Pause the running VM, write its state to ``path``, resume it (also when saving fails)."""
    monitor = _monitor(spec)
    try:
        _cmd(monitor, spec, "stop")
        try:
            _cmd(monitor, spec, "migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            with open(path, "wb") as state:
                monitor.send_fd_scm(state.fileno())
                _cmd(monitor, spec, "getfd", fdname="snapshot")
                _cmd(monitor, spec, "migrate", uri="fd:snapshot")
                # query-migrate passes setup, active, device, cancelling...; two statuses end it
                _await_status(
                    monitor,
                    spec,
                    "query-migrate",
                    "completed",
                    failed=lambda status: status in ("failed", "cancelled"),
                    doing="saving its state",
                    timeout=timeout,
                    interval=0.02,
                )
        finally:
            _cmd(monitor, spec, "cont")
    finally:
        monitor.close()


def _await_status(
    monitor: QEMUMonitorProtocol,
    spec: MachineSpec,
    query: str,
    done: str,
    *,
    failed: Callable[[str | None], bool],
    doing: str,
    timeout: float,
    interval: float,
) -> None:
    """Ask QMP ``query`` every ``interval`` s until its reply's status is ``done``; a status
    ``failed`` accepts ends it with QEMU's own error text (``error-desc``) when it gave one."""
    deadline = time.monotonic() + timeout
    while True:
        info = _cmd(monitor, spec, query)
        status = info.get("status") if isinstance(info, dict) else None
        if status == done:
            return
        if failed(status):
            desc = info.get("error-desc") if isinstance(info, dict) else None
            raise MachineError(
                f"{spec.name}: {doing} ended in state {status!r}" + (f": {desc}" if desc else "")
            )
        if time.monotonic() > deadline:
            raise MachineError(f"{spec.name}: {doing} took over {timeout:.0f} s")
        time.sleep(interval)


def resume_restored(
    spec: MachineSpec, alive: Callable[[], bool], timeout: float = SAVE_TIMEOUT
) -> None:
    """Wait until a QEMU started with ``-S -incoming`` has loaded its state, then run it."""
    monitor = _monitor(spec, alive)
    try:
        # query-status while loading: inmigrate (prelaunch before it starts); paused once loaded
        _await_status(
            monitor,
            spec,
            "query-status",
            "paused",
            failed=lambda status: status not in ("inmigrate", "prelaunch"),
            doing="restoring its state",
            timeout=timeout,
            interval=0.005,
        )
        _cmd(monitor, spec, "cont")
    finally:
        monitor.close()
