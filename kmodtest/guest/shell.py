"""An interactive root shell in a running guest, over a console port hot-plugged for it.

The agent channel is request/response and the serial console belongs to the kernel's log, so a
shell gets its own line: a ``virtconsole`` port added through QMP (a unix socket on the host,
``/dev/hvcN`` in the guest). In the guest, socat relays that port (raw) to a fresh pty on which
busybox's ash runs as session leader with the pty as its controlling terminal, so Ctrl-C,
job control and the window size behave as on any terminal. socat is also what gives the shell
a default SIGINT: everything the agent starts runs in the background of a non-interactive
shell, where SIGINT is ignored and no shell can un-ignore it; socat's child resets it.
Nothing here changes the image: a VM kept from a test run gets a shell the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kmodtest.errors import ChannelError, MachineError
from kmodtest.guest.stream import Runs, shell_literal
from kmodtest.run.qmp import Qmp

PORT_PREFIX = "org.kmodtest.shell."
# what the guest writes to the console port when the shell exits (an OSC sequence no terminal
# displays), so the host leaves at once instead of waiting on a silent socket
EXIT_MARK = b"\x1b]777;kmodtest-shell-exit\x07"
STATE = "/run/kmodtest"
_tags = itertools.count(1)


@dataclass
class GuestShell:
    guest: Runs  # the agent channel of the guest
    qmp_socket: Path
    run_dir: Path  # where the host end of the port's socket goes
    tag: str = ""
    sock: socket.socket | None = None
    socat_pid: int = 0
    tty: str = ""

    def open(self, term: str, rows: int, cols: int) -> socket.socket:
        """Plug the port, start the shell on it, and return the host end of the port."""
        self.tag = f"{os.getpid()}-{next(_tags)}"
        path = self.run_dir / f"sh-{self.tag}.sock"
        before = self._consoles()
        with Qmp(self.qmp_socket) as qmp:
            qmp.execute(
                "chardev-add", id=f"ktsh-{self.tag}",
                backend={"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": str(path)}},
                    "server": True, "wait": False}},
            )  # fmt: skip
            qmp.execute(
                "device_add", driver="virtconsole", id=f"ktshdev-{self.tag}", bus="vser0.0",
                chardev=f"ktsh-{self.tag}", name=PORT_PREFIX + self.tag,
            )  # fmt: skip
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        hvc = self._new_console(before)
        script = f"{STATE}/sh-{self.tag}"
        term = "".join(c for c in term if c.isalnum() or c in "-_.") or "vt100"
        lines = (
            f"tty >{script}.tty",
            # the size is set before the shell starts: set later, it reaches ash as a SIGWINCH
            # while it draws its first prompt, racing the first keys
            f"stty rows {max(rows, 1)} cols {max(cols, 1)}",
            f"export TERM={term} ENV=/etc/kmodtest/shadows HOME=/root",
            "cd /root",
            "/bin/busybox sh -i",
            "printf '\\033]777;kmodtest-shell-exit\\007'",  # EXIT_MARK
        )
        reply = self.guest.run(
            f"printf %b {shell_literal(chr(10).join(lines) + chr(10))} >{script}.sh && "
            f"socat {hvc},rawer EXEC:'/bin/busybox sh {script}.sh',pty,setsid,ctty,stderr "
            f">{script}.log 2>&1 </dev/null & echo $!",
            timeout=30,
        )
        if reply.exit_status != 0:
            raise ChannelError(f"could not start a shell in the guest: {reply.stderr!r}")
        self.socat_pid = int(reply.stdout.split()[-1])
        self.tty = self._wait_for(f"{script}.tty")
        return self.sock

    def _consoles(self) -> set[str]:
        """The guest's hvc devices that have a port behind them (the others fail to open)."""
        reply = self.guest.run(
            "for t in /dev/hvc*; do stty -F $t >/dev/null 2>&1 && echo $t; done; :", timeout=30
        )
        return set(reply.stdout.decode().split())

    def _new_console(self, before: set[str]) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if new := sorted(self._consoles() - before):
                return new[0]
            time.sleep(0.2)
        raise MachineError(
            "the guest did not see the shell's console port within 20 s",
            "the guest kernel needs virtio_console (the default images load it at boot)",
        )

    def _wait_for(self, path: str) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            reply = self.guest.run(f"cat {path} 2>/dev/null", timeout=30)
            if reply.exit_status == 0 and reply.stdout.strip():
                return reply.stdout.decode().strip()
            time.sleep(0.1)
        log = self.guest.run(f"cat {STATE}/sh-{self.tag}.log 2>&1; :").stdout.decode()
        raise MachineError(f"the guest shell did not start: {log.strip()[-500:]}")

    def resize(self, rows: int, cols: int) -> None:
        """The terminal's size on the guest's pty (the shell gets SIGWINCH)."""
        if self.tty and rows > 0 and cols > 0:
            self.guest.run(f"stty -F {self.tty} rows {rows} cols {cols}; :", timeout=30)

    def close(self, unplug: bool = True) -> None:
        """Stop the shell (and what runs in its session), unplug the port; never raises.
        ``unplug=False``: only the host end closes (the VM is about to be stopped anyway)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if not unplug:
            return
        if self.socat_pid:
            with contextlib.suppress(ChannelError, OSError):  # a guest that is gone runs nothing
                self.guest.run(
                    f"kill -HUP {self.socat_pid} 2>/dev/null; rm -f {STATE}/sh-{self.tag}.*; :",
                    timeout=30,
                )
            self.socat_pid = 0
        try:
            with Qmp(self.qmp_socket) as qmp:
                qmp.execute("device_del", id=f"ktshdev-{self.tag}")
                deadline = time.monotonic() + 10  # the guest acknowledges the unplug
                while True:
                    try:
                        qmp.execute("chardev-remove", id=f"ktsh-{self.tag}")
                        break
                    except MachineError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.2)
        except (MachineError, OSError):
            pass  # QEMU is gone, or does not answer
        (self.run_dir / f"sh-{self.tag}.sock").unlink(missing_ok=True)
