"""A minimal QMP client (QEMU's JSON control socket), for what a running VM is asked later:
hot-plugging a console port for a shell, quitting a VM no process of ours owns any more.

QEMU's own ``qemu.qmp`` package is asyncio-only; the few synchronous commands needed here are
a greeting, ``qmp_capabilities`` and one request/response each.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from kmodtest.errors import MachineError


class Qmp:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise MachineError(
                f"cannot reach QEMU's control socket {path}: {exc.strerror or exc}",
                "is the VM still running? (kmodtest ps)",
            ) from None
        self._file = self.sock.makefile("rb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise MachineError(f"QEMU closed its control socket {self.path}")
            message = json.loads(line)
            if "event" not in message:
                return dict(message)

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise MachineError(f"QEMU refused {command}: {reply['error'].get('desc', reply)}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
