"""What a VM test runs on: a matrix cell and the NIC model its router's ports use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kmodtest.prepare.cells import Cell


def wanted_nics(option: str | None) -> list[str] | None:
    """The ``--nic`` option as a list; None when absent (every model a cell lists)."""
    return [n.strip() for n in option.split(",")] if option else None


def case_nics(cell: Cell, wanted: Sequence[str] | None) -> list[str]:
    """The NIC models a cell's per-NIC tests run on; its per-kernel tests use the first.

    One rule for parametrization and for the xdist scheduler, which must agree on it.
    """
    return [n for n in cell.nic_cases if wanted is None or n in wanted]


@dataclass(frozen=True)
class VmCase:
    """A cell and the NIC model its router uses: one booted lab serves all its tests."""

    cell: Cell
    nic: str
    # only the test id depends on it: equal cases share one VM, and pytest (which groups
    # session-scoped parameters by equality) runs per-kernel tests next to the per-NIC tests
    # of the same cell and NIC, so that VM boots once
    per_nic: bool = field(default=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.cell.id}-{self.nic}" if self.per_nic else self.cell.id

    @property
    def key(self) -> tuple[str, str]:
        return (self.cell.id, self.nic)

    @property
    def name(self) -> str:
        """The lab's name: in log directories and QEMU's -name."""
        return f"{self.cell.id}-{self.nic}"
