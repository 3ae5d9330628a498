"""A pytest-testinfra backend over the agent channel, so VM tests read like testinfra tests."""

from __future__ import annotations

from typing import Any

import testinfra.host
from testinfra.backend.base import BaseBackend, CommandResult

from kmodtest.guest.channel import AgentChannel

DEFAULT_TIMEOUT = 120.0


class AgentBackend(BaseBackend):
    """``host.run`` -> one agent request; ``timeout=`` may be passed per command."""

    NAME = "kmodtest"

    def __init__(self, channel: AgentChannel, hostname: str, **kwargs: Any) -> None:
        super().__init__(hostname, **kwargs)
        self.channel = channel

    def get_pytest_id(self) -> str:
        return f"kmodtest://{self.hostname}"

    def get_encoding(self) -> str:
        return "utf-8"  # the image has no Python for testinfra's locale probe

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        timeout = float(kwargs.pop("timeout", DEFAULT_TIMEOUT))
        cmd = self.get_command(command, *args)
        reply = self.channel.run(cmd, timeout=timeout)
        return self.result(reply.exit_status, self.encode(cmd), reply.stdout, reply.stderr)


def make_host(channel: AgentChannel, hostname: str) -> testinfra.host.Host:
    return testinfra.host.Host(AgentBackend(channel, hostname))
