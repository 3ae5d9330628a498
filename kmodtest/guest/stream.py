"""The agent channel's streaming mode: a guest command's output as it is written.

The channel answers one request at a time, with the whole output at the end, which suits tests
but not a user watching a selftest run for minutes. Here the command runs detached in the guest
(its own session, so a timeout kills everything it started), writing to files, and the host
asks the agent for what was appended since the last look. Each look is one ordinary request
(stdout and stderr kept apart, binary-safe), so nothing in the agent changes and a command the
host stops asking about is still killed with its process group.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from kmodtest.errors import ChannelError
from kmodtest.guest.channel import Reply

STATE_DIR = "/run/kmodtest/stream"
POLL_FIRST = 0.05  # seconds between looks: short at first (quick commands), then longer
POLL_MAX = 0.5
LOOK_TIMEOUT = 30.0
_ids = itertools.count(1)


class Runs(Protocol):
    def run(self, command: str, timeout: float = 120.0) -> Reply: ...


def shell_literal(text: str) -> str:
    """``text`` as a single-quoted ``printf %b`` argument: every byte but [A-Za-z0-9] octal."""
    plain = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return "'" + "".join(chr(b) if b in plain else f"\\0{b:03o}" for b in text.encode()) + "'"


@dataclass(frozen=True)
class StreamResult:
    exit_status: int | None  # None when it timed out
    timed_out: bool
    seconds: float


@dataclass
class StreamedCommand:
    """One command running detached in the guest; :meth:`wait` copies its output out."""

    guest: Runs
    command: str
    directory: str = ""
    pid: int = 0
    out_offset: int = 0
    err_offset: int = 0

    def start(self) -> None:
        self.directory = f"{STATE_DIR}/{time.time_ns()}-{next(_ids)}"
        d = self.directory
        # the agent's environment (shadows: iproute2's ip, kmod's modprobe ...), its own session;
        # out and err exist before it starts: a first look may come before its shell opened them
        launcher = (
            f"mkdir -p {d} && : >{d}/out && : >{d}/err && "
            f"printf %b {shell_literal(self.command)} >{d}/cmd && "
            f"setsid /bin/busybox sh -c '. /etc/kmodtest/shadows; ( . {d}/cmd ) </dev/null "
            f">{d}/out 2>{d}/err; echo $? >{d}/rc.new; mv {d}/rc.new {d}/rc' "
            f">/dev/null 2>&1 </dev/null & echo $!"
        )
        reply = self.guest.run(launcher, timeout=LOOK_TIMEOUT)
        if reply.exit_status != 0:
            raise ChannelError(
                f"could not start the command in the guest: {reply.stderr.decode(errors='replace')}"
            )
        self.pid = int(reply.stdout.split()[-1])

    def _look(self) -> tuple[bytes, bytes, bool]:
        """What was appended to stdout and stderr, and whether the command had ended before."""
        d = self.directory
        reply = self.guest.run(
            f"[ -e {d}/rc ]; f=$?; tail -c +{self.out_offset + 1} {d}/out; "
            f"tail -c +{self.err_offset + 1} {d}/err >&2; exit $f",
            timeout=LOOK_TIMEOUT,
        )
        self.out_offset += len(reply.stdout)
        self.err_offset += len(reply.stderr)
        return reply.stdout, reply.stderr, reply.exit_status == 0

    def wait(
        self, out: BinaryIO, err: BinaryIO, timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> StreamResult:  # fmt: skip
        """Copy output as it comes until the command ends or ``timeout`` s have passed (then
        its whole process group is killed)."""
        start = clock()
        pause = POLL_FIRST
        while True:
            chunk_out, chunk_err, ended = self._look()
            for data, stream in ((chunk_out, out), (chunk_err, err)):
                if data:
                    stream.write(data)
                    stream.flush()
            if ended:
                rc = int(self.guest.run(f"cat {self.directory}/rc").stdout.strip() or 255)
                self._clean()
                return StreamResult(rc, False, clock() - start)
            if timeout is not None and clock() - start > timeout:
                self.kill()
                self._look_after_kill(out, err)
                return StreamResult(None, True, clock() - start)
            if not (chunk_out or chunk_err):
                time.sleep(pause)
                pause = min(pause * 2, POLL_MAX)
            else:
                pause = POLL_FIRST

    def kill(self) -> None:
        """Kill the command and everything in its session (setsid made it the group leader)."""
        self.guest.run(f"kill -KILL -{self.pid} 2>/dev/null; :", timeout=LOOK_TIMEOUT)

    def _look_after_kill(self, out: BinaryIO, err: BinaryIO) -> None:
        chunk_out, chunk_err, _ = self._look()
        out.write(chunk_out)
        err.write(chunk_err)
        out.flush()
        err.flush()
        self._clean()

    def _clean(self) -> None:
        self.guest.run(f"rm -rf {self.directory}", timeout=LOOK_TIMEOUT)
