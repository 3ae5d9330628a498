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
        tty.setraw(fd, termios.TCSADRAIN)  # not the default TCSAFLUSH: keys typed ahead stay
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def bridge(
    sock: socket.socket, stdin_fd: int, stdout_fd: int, on_resize: Callable[[int, int], None]
) -> str:
    """Copy keys to the guest and its output back until the user leaves or the shell ends;
    why it ended ("escape", "exit", "closed").

    The window size is compared on every wake-up (keys, output, or 0.5 s), before keys are
    passed on: keys typed after a resize reach a guest that has the new size."""
    size = terminal_size(stdin_fd)
    held = b""  # output that may be the start of EXIT_MARK: shown once it turns out not to be
    with raw_mode(stdin_fd):
        while True:
            ready, _, _ = select.select([sock, stdin_fd], [], [], 0.5)
            if (now := terminal_size(stdin_fd)) != size:
                size = now
                on_resize(*size)
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
                received = sock.recv(65536)
                data = held + received
                if not received:
                    os.write(stdout_fd, data)
                    return "closed"
                if (at := data.find(EXIT_MARK)) >= 0:
                    os.write(stdout_fd, data[:at])
                    return "exit"
                keep = _mark_start(data)
                os.write(stdout_fd, data[: len(data) - keep])
                held = data[len(data) - keep :]


def _mark_start(data: bytes) -> int:
    """The length of the longest end of ``data`` that EXIT_MARK starts with (0: none)."""
    for length in range(min(len(data), len(EXIT_MARK) - 1), 0, -1):
        if data.endswith(EXIT_MARK[:length]):
            return length
    return 0
