"""A small testinfra-style API over ``nft`` in the guest: JSON listings and atomic batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import testinfra.host
from testinfra.backend.base import CommandResult


@dataclass(frozen=True)
class Flowtable:
    family: str
    table: str
    name: str
    hook: str
    prio: int
    devices: tuple[str, ...]
    flags: tuple[str, ...]


class Nft:
    def __init__(self, host: testinfra.host.Host) -> None:
        self.host = host

    def run(self, args: str) -> CommandResult:
        return self.host.run(f"nft {args}")

    def apply(self, ruleset: str) -> CommandResult:
        """Load ``ruleset`` as one atomic batch (``nft -f``): all of it or none of it."""
        return self.host.run(f"nft -f - <<'KMODTEST_EOF'\n{ruleset}\nKMODTEST_EOF")

    def ruleset(self) -> str:
        return str(self.host.check_output("nft list ruleset"))

    def json(self, what: str) -> list[dict[str, Any]]:
        """``nft -j list <what>`` as its list of objects (metainfo dropped)."""
        data = json.loads(self.host.check_output(f"nft -j list {what}"))
        return [obj for obj in data["nftables"] if "metainfo" not in obj]

    def flowtables(self) -> list[Flowtable]:
        out = []
        for obj in self.json("flowtables"):
            ft = obj["flowtable"]
            devices = ft.get("dev", [])
            out.append(
                Flowtable(
                    family=ft["family"],
                    table=ft["table"],
                    name=ft["name"],
                    hook=ft["hook"],
                    prio=int(ft["prio"]),
                    devices=tuple([devices] if isinstance(devices, str) else devices),
                    flags=tuple(ft.get("flags", [])),
                )
            )
        return out
