"""Kernel health: find oopses, WARNs and panics in the console log, test by test."""

from __future__ import annotations

import re
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
