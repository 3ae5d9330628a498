"""Loopback TCP ports for libvirt's ``<interface type='server'/'client'>`` links, no collisions.

QEMU binds the ports itself, so kmodtest cannot hold them open while it starts. Two things
keep parallel runs (xdist workers, several checkouts, several users) apart instead:

1. the kernel picks each port (bind to port 0), so it is free at that moment;
2. a lease: an ``flock`` on ``<lock dir>/<port>`` held for as long as the VM runs. Another
   kmodtest that gets the same port from the kernel before QEMU has bound it sees the lock
   and asks again.

A program outside kmodtest could still take a port in that window; QEMU then fails to bind
and the launcher retries with new ports (:data:`BIND_RETRIES` in :mod:`kmodtest.run.libvirt`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LOCK_DIR = Path(tempfile.gettempdir()) / "kmodtest-link-ports"


def _lock_dir() -> Path:
    LOCK_DIR.mkdir(mode=0o1777, exist_ok=True)
    with contextlib.suppress(PermissionError):  # another user made it; it is 1777 already
        LOCK_DIR.chmod(0o1777)
    return LOCK_DIR


@dataclass
class PortLease:
    """Ports held for one VM; ``release()`` gives them back (idempotent)."""

    ports: list[int] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def take(cls, count: int, host: str = "127.0.0.1") -> PortLease:
        lease = cls()
        held: list[socket.socket] = []  # keep ours bound until all are chosen: no duplicates
        try:
            while len(lease.ports) < count:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((host, 0))
                held.append(sock)
                port = sock.getsockname()[1]
                fd = os.open(_lock_dir() / str(port), os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another kmodtest VM holds it
                    os.close(fd)
                    continue
                lease.ports.append(port)
                lease._fds.append(fd)
        except BaseException:
            lease.release()
            raise
        finally:
            for sock in held:
                sock.close()
        return lease

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing drops the flock; the file stays for the next lease
        self._fds.clear()
