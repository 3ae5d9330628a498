"""Progress for long builds and boots, shown with rich on stderr and mirrored to ``logging``."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from rich.console import Console

log = logging.getLogger("kmodtest")


class Progress:
    """Named steps with elapsed times; ``detail`` updates the spinner line within a step."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._status: object | None = None

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        log.info("%s ...", title)
        start = time.monotonic()
        if self.quiet:
            yield
        else:
            with self.console.status(title) as status:
                self._status = status
                try:
                    yield
                finally:
                    self._status = None
        took = time.monotonic() - start
        log.info("%s: done in %.1f s", title, took)
        if not self.quiet:
            self.console.print(f"[green]✓[/] {title} [dim]({took:.1f} s)[/]")

    def detail(self, text: str) -> None:
        log.debug("%s", text)
        if self._status is not None:
            self._status.update(text)  # type: ignore[attr-defined]
