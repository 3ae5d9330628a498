"""The host half of `kmodtest shell`: keys out, output back, the escape, the shell's exit mark
and resizes, on a real pty and a socket pair (the guest's console port, as the host sees it)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import socket
import struct
import termios
import threading
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kmodtest.face.terminal import bridge
from kmodtest.guest.shell import EXIT_MARK


@dataclass
class Session:
    master: int  # the user's terminal
    guest: socket.socket  # the guest's end of the console port
    events: list[tuple[str, object]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def keys_seen(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            data += self.guest.recv(4096)
        self.events.append(("keys", data))
        return data

    def end(self) -> str:
        assert self.thread is not None
        self.thread.join(10)
        assert not self.thread.is_alive(), "the bridge did not end"
        return self.ended[0]


@pytest.fixture
def session() -> Iterator[Session]:
    master, slave = pty.openpty()
    tty.setraw(slave)  # as the bridge sets it, but before the first key is typed
    host, guest = socket.socketpair()
    s = Session(master, guest)
    s.resize(30, 100)

    def run() -> None:
        s.ended.append(bridge(host, slave, slave, lambda r, c: s.events.append(("size", (r, c)))))

    s.thread = threading.Thread(target=run, daemon=True)
    s.thread.start()
    yield s
    for fd in (master, slave):
        os.close(fd)
    host.close()
    guest.close()


def test_keys_before_the_escape_reach_the_guest_and_the_escape_leaves(session: Session) -> None:
    os.write(session.master, b"ls\r\x1dnever")
    assert session.keys_seen(3) == b"ls\r"
    assert session.end() == "escape"


def test_output_up_to_the_shell_s_exit_mark_is_shown_and_the_session_ends(
    session: Session,
) -> None:
    half = len(EXIT_MARK) // 2
    session.guest.sendall(b"bye\r\n" + EXIT_MARK[:half])
    assert os.read(session.master, 4096) == b"bye\r\n"  # what may start the mark waits ...
    session.guest.sendall(EXIT_MARK[half:] + b"after")
    assert session.end() == "exit"
    assert select.select([session.master], [], [], 0.5)[0] == []  # ... and never shows


def test_output_that_only_looked_like_the_mark_s_start_is_shown(session: Session) -> None:
    session.guest.sendall(b"x" + EXIT_MARK[:3])
    assert os.read(session.master, 4096) == b"x"
    session.guest.sendall(b"y")
    assert os.read(session.master, 4096) == EXIT_MARK[:3] + b"y"
    os.write(session.master, b"\x1d")
    assert session.end() == "escape"


def test_a_resize_reaches_the_guest_before_keys_typed_after_it(session: Session) -> None:
    session.resize(40, 120)
    os.write(session.master, b"stty size\r")
    session.keys_seen(10)
    assert session.events == [("size", (40, 120)), ("keys", b"stty size\r")]
    os.write(session.master, b"\x1d")
    assert session.end() == "escape"


def test_the_guest_closing_its_port_ends_the_session(session: Session) -> None:
    session.guest.shutdown(socket.SHUT_WR)
    assert session.end() == "closed"
