"""Drive a serial console just far enough to start something: expect text, type a line.

For images that have no agent of ours (OpenWrt): the console is QEMU's serial chardev on a
unix socket, with every byte the guest prints also logged to ``console.log``. Matching reads
the log (so nothing printed before we connected is missed) after removing terminal escape
sequences and carriage returns; kernel messages may interleave anywhere, so callers match
output that only a command's result can produce (``echo KT_$((20+22))`` prints ``KT_42``;
its echoed command line does not), never a whole screen. Every wait has a deadline and fails
naming what it waited for and the last console lines.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from kmodtest.errors import MachineError
from kmodtest.guest.health import tail

# CSI sequences (colours, cursor moves, ash's ESC[6n cursor query), charset selects, CR
_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r")


class ConsoleError(MachineError):
    """The console did not show what was expected in time."""


class Console:
    def __init__(self, sock_path: Path, log_path: Path, alive: Callable[[], bool]) -> None:
        self.sock_path = sock_path
        self.log_path = log_path
        self.alive = alive
        self.sock: socket.socket | None = None
        self.text = ""  # the cleaned console log so far
        self.mark = 0  # matching starts here: the end of the last match
        self._raw = b""
        self._offset = 0

    def connect(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.sock_path))
                sock.setblocking(False)
                self.sock = sock
                return
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not self.alive():
                    raise ConsoleError("QEMU exited before its console socket appeared") from None
                if time.monotonic() > deadline:
                    raise ConsoleError(f"console socket {self.sock_path} did not appear") from None
                time.sleep(0.02)

    def close(self) -> None:
        """Disconnect: QEMU then discards console output (still logging it) instead of
        waiting for a reader."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, text: str) -> None:
        if self.sock is None:
            raise ConsoleError("the console is not connected")
        self.sock.setblocking(True)
        try:
            self.sock.sendall(text.encode())
        finally:
            self.sock.setblocking(False)

    def line(self, command: str) -> None:
        """Type one shell line (Enter is a carriage return, as a terminal sends it)."""
        self.send(command + "\r")

    def expect(self, pattern: str | re.Pattern[str], timeout: float, what: str) -> re.Match[str]:
        """Wait for ``pattern`` in the console output after the last match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            self._pump()
            if match := regex.search(self.text, self.mark):
                self.mark = match.end()
                return match
            if not self.alive():
                raise ConsoleError(
                    f"QEMU exited while waiting for {what} on the console\n"
                    f"last console lines:\n{tail(self.log_path)}",
                    f"see {self.log_path}",
                )
            if time.monotonic() > deadline:
                raise ConsoleError(
                    f"no {what} on the console within {timeout:.0f} s\n"
                    f"last console lines:\n{tail(self.log_path)}",
                    f"see {self.log_path}; a slow host may need a larger boot timeout",
                )
            time.sleep(0.05)

    def _pump(self) -> None:
        """Drain the socket (QEMU must never wait on us) and read new log bytes."""
        if self.sock is not None:
            try:
                while self.sock.recv(1 << 16):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.close()
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self._offset)
                new = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(new)
        data = self._raw + new
        # keep a trailing partial escape sequence for the next read
        cut = data.rfind(b"\x1b")
        if cut >= 0 and len(data) - cut < 16 and not _ESCAPES.match(data, cut):
            data, self._raw = data[:cut], data[cut:]
        else:
            self._raw = b""
        self.text += _ESCAPES.sub(b"", data).decode(errors="replace")
