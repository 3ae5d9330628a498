"""Kernel health: find oopses, WARNs and panics in the console log, test by test."""

from __future__ import annotations

import re
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


@dataclass(frozen=True)
class HealthProblem:
    pattern: str
    excerpt: str

    def __str__(self) -> str:
        return f"kernel reported {self.pattern!r}:\n{self.excerpt}"


class ConsoleWatch:
    """Reads a growing console log from a mark; ``scan()`` returns the first problem since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def _read_from(self, offset: int) -> str:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> None:
        """Start attributing console output to the next test from here."""
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0

    def scan(self, context_lines: int = 30) -> HealthProblem | None:
        text = self._read_from(self.offset)
        lines = text.splitlines()
        for index, line in enumerate(lines):
            match = _BAD.search(line)
            if match:
                start = max(0, index - 3)
                excerpt = "\n".join(lines[start : index + context_lines])
                return HealthProblem(match.group(0), excerpt)
        return None


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
