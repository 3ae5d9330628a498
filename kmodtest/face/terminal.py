"""The user's terminal joined to a guest shell: raw mode, window size, an escape key.

In raw mode every key, Ctrl-C included, goes to the guest, whose pty turns it into a signal
there. Ctrl-] (the byte 0x1d, as in telnet and ``virsh console``) leaves; so does the guest
shell exiting (:data:`~kmodtest.guest.shell.EXIT_MARK`) or the VM going away.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import termios
import tty
from collections.abc import Callable, Iterator

from kmodtest.guest.shell import EXIT_MARK

ESCAPE = b"\x1d"  # Ctrl-]
ESCAPE_NAME = "Ctrl-]"


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``, else of $LINES/$COLUMNS, else 24x80."""
    try:
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    except OSError:
        fallback = shutil.get_terminal_size((80, 24))
        return fallback.lines, fallback.columns


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode (no echo, no signals from keys), restored after."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def bridge(
    sock: socket.socket, stdin_fd: int, stdout_fd: int, on_resize: Callable[[int, int], None]
) -> str:
    """Copy keys to the guest and its output back until the user leaves or the shell ends;
    why it ended ("escape", "exit", "closed")."""
    resized = False

    def winch(_signum: int, _frame: object) -> None:
        nonlocal resized
        resized = True

    previous = signal.signal(signal.SIGWINCH, winch)
    tail = b""  # the last bytes of output, for an EXIT_MARK split across reads
    try:
        with raw_mode(stdin_fd):
            while True:
                if resized:
                    resized = False
                    on_resize(*terminal_size(stdin_fd))
                try:
                    ready, _, _ = select.select([sock, stdin_fd], [], [], 0.5)
                except InterruptedError:
                    continue
                if stdin_fd in ready:
                    keys = os.read(stdin_fd, 4096)
                    if not keys:
                        return "closed"
                    before, escape, _ = keys.partition(ESCAPE)
                    if before:
                        sock.sendall(before)
                    if escape:
                        return "escape"
                if sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return "closed"
                    seen = tail + data
                    if (at := seen.find(EXIT_MARK)) >= 0:
                        os.write(stdout_fd, data[: max(0, at - len(tail))])
                        return "exit"
                    os.write(stdout_fd, data)
                    tail = seen[-len(EXIT_MARK) :]
    finally:
        signal.signal(signal.SIGWINCH, previous)
