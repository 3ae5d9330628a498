"""Module load failures, read from the kernel's own messages on the console.

A patched module that cannot load (a symbol the running kernel does not export, a vermagic or
symbol-CRC mismatch) makes every later test fail in confusing ways; the kernel says exactly why
at ``KERN_WARNING``/``KERN_ERR``, which the console (``loglevel=5``) keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# "[   12.3] nf_flow_table: Unknown symbol kmodtest_missing (err -2)"
_PATTERNS = {
    "unknown symbol": re.compile(r"(?P<module>[\w-]+): Unknown symbol (?P<what>\S+)"),
    "version magic mismatch": re.compile(
        r"(?P<module>[\w-]+): version magic '(?P<what>[^']*)' should be"
    ),
    "symbol version (CRC) mismatch": re.compile(
        r"(?P<module>[\w-]+): disagrees about version of symbol (?P<what>\S+)"
    ),
    "no symbol version": re.compile(r"(?P<module>[\w-]+): no symbol version for (?P<what>\S+)"),
}
_TIMESTAMP = re.compile(r"^\s*\[\s*\d+\.\d+\]\s*")


@dataclass(frozen=True)
class LoadFailure:
    module: str
    kind: str  # one of _PATTERNS' keys
    what: str  # the symbol, the vermagic, ...
    line: str  # the kernel's message, without its timestamp

    def __str__(self) -> str:
        return f"{self.module}: {self.kind} ({self.line})"


def parse(text: str) -> list[LoadFailure]:
    """Every distinct load failure in kernel log text, in order of appearance."""
    out: list[LoadFailure] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        line = _TIMESTAMP.sub("", raw.strip())
        for kind, pattern in _PATTERNS.items():
            m = pattern.search(line)
            if m and line not in seen:
                seen.add(line)
                out.append(LoadFailure(m["module"], kind, m["what"], line))
                break
    return out


def load_failures(console_log: Path) -> list[LoadFailure]:
    try:
        return parse(console_log.read_text(errors="replace"))
    except FileNotFoundError:
        return []
