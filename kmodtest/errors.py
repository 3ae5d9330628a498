"""One exception type that always says what went wrong *and* how to fix it."""

from __future__ import annotations


class KmodtestError(Exception):
    """A user-facing failure: ``problem`` names what is wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class ConfigError(KmodtestError):
    """Bad input data: a kernels/ or images/ YAML file, or a bad option value."""


class BuildError(KmodtestError):
    """An image could not be built (package fetch, module closure, archive)."""


class MachineError(KmodtestError):
    """QEMU could not be started, died, or the guest did not come up."""


class ChannelError(KmodtestError):
    """The guest agent channel broke (closed, garbled, or timed out)."""


class CommandTimeout(ChannelError):
    """A guest command did not finish in its time; the channel stays usable."""
