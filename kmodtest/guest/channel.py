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


class AgentChannel:
    """A connection to the agent over QEMU's unix socket chardev."""

    def __init__(self, path: Path, alive: Callable[[], bool] = lambda: True) -> None:
        self.path = path
        self.alive = alive
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._pending_body = 0  # body bytes of a reply whose header a timed-out call consumed

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                self._sock = sock
                return
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not self.alive():
                    raise ChannelError("QEMU exited before its agent socket appeared") from None
                if time.monotonic() > deadline:
                    raise ChannelError(f"agent socket {self.path} did not appear") from None
                time.sleep(0.01)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def run(self, command: str, timeout: float = 60.0) -> Reply:
        if self._sock is None:
            raise ChannelError("agent channel is not connected")
        req_id = next(self._ids)
        guest_timeout = max(1, math.ceil(timeout))
        payload = encode_command(command)
        self._sock.sendall(f"{req_id} {guest_timeout} {payload}\n".encode())
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
                    f"stdout so far: {reply.stdout[-500:]!r}\nstderr so far: {reply.stderr[-500:]!r}",
                    "pass a larger timeout= if the command legitimately takes longer",
                )
            return reply
            # a late reply to an earlier, timed-out request: drop it and keep reading

    def _fill(self, deadline: float, command: str) -> None:
        assert self._sock is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(f"guest command timed out: {command[:200]!r}")
            self._sock.settimeout(min(remaining, 0.5))
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                if not self.alive():
                    raise ChannelError("QEMU exited while a command was running") from None
                continue
            if not chunk:
                raise ChannelError("agent channel closed by QEMU")
            self._buf += chunk
            return

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
