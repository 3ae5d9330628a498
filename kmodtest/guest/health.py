"""Kernel health: find oopses, WARNs and panics in a console log, every byte exactly once.

A :class:`ConsoleWatch` remembers how far the log has been scanned; each :meth:`~ConsoleWatch.scan`
covers what arrived since the previous one, so consecutive scans cut the log into windows
that neither overlap nor leave gaps. The lifecycle ends a window at a sync line the guest
writes to ``/dev/kmsg`` (:func:`sync_command`): everything the kernel logged before it, e.g.
during the reset after a test, is then on the console and lands in that test's window.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# What the kernel prints when something went wrong; any one fails the test that caused it.
PATTERNS = (
    "Kernel panic",
    "BUG:",
    "WARNING:",
    "Oops",
    "general protection fault",
    "KASAN",
    "UBSAN",
    "Call Trace:",
    "suspected memory leak",  # kmemleak (see Kmemleak: its scan is read, not the console)
)
_BAD = re.compile("|".join(re.escape(p) for p in PATTERNS))
SYNC_PREFIX = "kmodtest: console sync"
_sync_ids = itertools.count(1)


@dataclass(frozen=True)
class HealthProblem:
    pattern: str
    excerpt: str

    def __str__(self) -> str:
        return f"kernel reported {self.pattern!r}:\n{self.excerpt}"


def sync_command() -> tuple[str, str]:
    """(guest command, console line): the line reaches the console after all earlier output.

    ``<4>`` is KERN_WARNING, printed at the ``loglevel=5`` the guests boot with.
    """
    line = f"{SYNC_PREFIX} {next(_sync_ids)}"
    return f"echo '<4>{line}' >/dev/kmsg", line


class ConsoleWatch:
    """A growing console log, scanned window by window; ``scanned`` bytes are behind us."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scanned = 0

    def _read(self, offset: int = 0) -> bytes:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(offset)
                return handle.read()
        except FileNotFoundError:
            return b""

    def wait_for(self, line: str, timeout: float = 30.0) -> bool:
        """Wait until ``line`` is in the unscanned part of the log (False: not in time)."""
        deadline = time.monotonic() + timeout
        needle = line.encode()
        while needle not in self._read(self.scanned):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def scan(self, final: bool = False, context_lines: int = 30) -> HealthProblem | None:
        """The first problem since the last scan. Only whole lines are taken (a line still
        being written belongs to the next window) unless ``final``: the machine is gone."""
        data = self._read(self.scanned)
        if not final:
            data = data[: data.rfind(b"\n") + 1]
        start = self.scanned
        self.scanned += len(data)
        text = data.decode(errors="replace")
        match = _BAD.search(text)
        if match is None:
            return None
        # the excerpt may reach past the window: the rest of a splat is context, not a new one
        lines = self._read(start).decode(errors="replace").splitlines()
        index = text.count("\n", 0, match.start())
        excerpt = "\n".join(lines[max(0, index - 3) : index + context_lines])
        return HealthProblem(match.group(0), excerpt)


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no console log)"


KMEMLEAK = "/sys/kernel/debug/kmemleak"
_KMEMLEAK_SCAN = (
    f"[ -e {KMEMLEAK} ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null; "
    f"[ -w {KMEMLEAK} ] || exit 3; echo scan > {KMEMLEAK}; echo scan > {KMEMLEAK}; "
    f"cat {KMEMLEAK}"
)


class Kmemleak:
    """kmemleak on kernels that have it (the debug cell): scanned after every test.

    kmemleak prints its findings at KERN_INFO, below the console's loglevel, so the report is
    read from debugfs and then cleared. An object is reported once it is 5 s old and was
    unchanged since the previous scan, hence two scans: a leak shows up after the leaking
    test if it ran 5 s past the allocation, else after a following one.
    """

    def __init__(self, run: Callable[[str], tuple[int, str]]) -> None:
        self.run = run  # guest command -> (exit status, stdout)
        self.available: bool | None = None

    def settle(self) -> None:
        """Forget what boot left (early allocations kmemleak cannot follow)."""
        status, _ = self.run(f"{_KMEMLEAK_SCAN} >/dev/null && echo clear > {KMEMLEAK}")
        self.available = status == 0

    def check(self) -> HealthProblem | None:
        if not self.available:
            return None
        status, report = self.run(_KMEMLEAK_SCAN)
        if status != 0 or not report.strip():
            return None
        self.run(f"echo clear > {KMEMLEAK}")
        return HealthProblem("suspected memory leak", report.strip()[:4000])
