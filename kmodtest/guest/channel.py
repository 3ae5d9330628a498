"""Host side of the guest agent protocol (guest side: ``files/agent``).

Request:  ``<id> <timeout-s> <command, escaped for printf %b>\\n``
Reply:    ``<id> <exit-code> <timed-out> <stdout-len> <stderr-len>\\n`` + stdout + stderr

Lengths make replies binary-safe; ids let a reply that arrives after its request timed out be
recognised and skipped, so one slow command never desyncs the next. The guest kills a command
at its timeout (guest clock, which under TCG may run fast or slow); the host gives up later,
at ``HOST_FACTOR * timeout + REPLY_MARGIN`` wall seconds, so a healthy guest always answers.
"""

from __future__ import annotations

import itertools
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kmodtest.errors import ChannelError, CommandTimeout

HOST_FACTOR = 2.0
REPLY_MARGIN = 5.0
_PLAIN = frozenset(range(0x21, 0x7F)) - {ord("\\")}


def encode_command(command: str) -> str:
    """One line for the agent's ``read``: everything but plain ASCII as ``\\0ooo``."""
    return "".join(chr(b) if b in _PLAIN else f"\\0{b:03o}" for b in command.encode())


@dataclass(frozen=True)
class Reply:
    exit_status: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class Transport(Protocol):
    """A byte stream to the agent: QEMU's unix socket here, a pty in the unit tests."""

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float) -> bytes | None:
        """Up to 1 MiB; ``None`` if nothing came within ``timeout``; ``b""`` at end of stream."""

    def close(self) -> None: ...


class UnixSocketTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: Path, timeout: float, alive: Callable[[], bool]) -> UnixSocketTransport:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not alive():
                    raise ChannelError("QEMU exited before its agent socket appeared") from None
                if time.monotonic() > deadline:
                    raise ChannelError(f"agent socket {path} did not appear") from None
                time.sleep(0.01)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1 << 20)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


class AgentChannel:
    """Request/response over a :class:`Transport`; at most one request in flight."""

    def __init__(self, transport: Transport, alive: Callable[[], bool] = lambda: True) -> None:
        self.transport = transport
        self.alive = alive
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._pending_body = 0  # body bytes of a reply whose header a timed-out call consumed
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def run(self, command: str, timeout: float = 60.0) -> Reply:
        if self.closed:
            raise ChannelError("agent channel is closed")
        req_id = next(self._ids)
        guest_timeout = max(1, math.ceil(timeout))
        self.transport.send(f"{req_id} {guest_timeout} {encode_command(command)}\n".encode())
        deadline = time.monotonic() + HOST_FACTOR * timeout + REPLY_MARGIN
        while True:
            if self._pending_body:
                self._read_exact(self._pending_body, deadline, command)
                self._pending_body = 0
            header = self._read_line(deadline, command)
            try:
                rid, rc, killed, out_len, err_len = (int(x) for x in header.split())
            except ValueError:
                raise ChannelError(f"garbled agent reply header {header!r}") from None
            self._pending_body = out_len + err_len
            body = self._read_exact(out_len + err_len, deadline, command)
            self._pending_body = 0
            if rid != req_id:
                continue  # a late reply to an earlier, timed-out request
            reply = Reply(rc, bytes(body[:out_len]), bytes(body[out_len:]), bool(killed))
            if reply.timed_out:
                raise CommandTimeout(
                    f"guest command killed after {guest_timeout} s: {command[:200]!r}\n"
                    f"stdout so far: {reply.stdout[-500:]!r}\n"
                    f"stderr so far: {reply.stderr[-500:]!r}",
                    "pass a larger timeout= if the command legitimately takes longer",
                )
            return reply

    def _fill(self, deadline: float, command: str) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(f"no reply from the guest agent in time: {command[:200]!r}")
            chunk = self.transport.recv(min(remaining, 0.5))
            if chunk is None:
                if not self.alive():
                    raise ChannelError("QEMU exited while a command was running")
                continue
            if not chunk:  # end of the socket: QEMU closed it, most often because it is dying
                if self._exits_within(2.0):
                    raise ChannelError("QEMU exited while a command was running")
                raise ChannelError("agent channel closed by QEMU")
            self._buf += chunk
            return

    def _exits_within(self, seconds: float) -> bool:
        """Whether QEMU is gone within ``seconds``: a killed process closes its sockets before
        its parent can see it exit."""
        end = time.monotonic() + seconds
        while self.alive():
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True

    def _read_line(self, deadline: float, command: str) -> str:
        while (end := self._buf.find(b"\n")) < 0:
            self._fill(deadline, command)
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line.decode(errors="replace")

    def _read_exact(self, size: int, deadline: float, command: str) -> bytearray:
        while len(self._buf) < size:
            self._fill(deadline, command)
        data = self._buf[:size]
        del self._buf[:size]
        return data
