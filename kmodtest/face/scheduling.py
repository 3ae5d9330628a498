"""Under ``pytest -n N``: every test of one VM case (cell + NIC model) goes to one worker.

A worker then boots each kernel once and reuses the VM, as a serial run does. This is an
xdist scheduler (``pytest_xdist_make_scheduler``) rather than ``xdist_group`` marks: with
pytest 9 the marks no longer reach the node ids xdist groups by (it rewrites ``item._nodeid``,
which pytest 9 no longer reads), so ``--dist loadgroup`` silently spreads a case over workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kmodtest.lifecycle.case import case_nics
from kmodtest.prepare.cells import Cell


def case_of(nodeid: str, cells: Sequence[Cell], nics: Sequence[str] | None) -> str | None:
    """The VM case (``<cell>-<nic>``) a test id runs on, or None for a test without a VM.

    Per-NIC ids hold ``<cell>-<nic>``; per-kernel ids hold ``<cell>`` alone and run on the
    cell's first selected NIC (see the plugin's parametrization). Ids are matched as whole
    ``-``-separated words, so ``…-e1000e-udp`` is e1000e's case, never e1000's.
    """
    if not nodeid.endswith("]") or "[" not in nodeid:
        return None
    params = f"-{nodeid[nodeid.index('[') + 1 : -1]}-"
    for cell in sorted(cells, key=lambda c: len(c.id), reverse=True):
        if f"-{cell.id}-" not in params:
            continue
        selected = case_nics(cell, nics)
        for nic in selected:
            if f"-{cell.id}-{nic}-" in params:
                return f"{cell.id}-{nic}"
        return f"{cell.id}-{selected[0]}" if selected else cell.id
    return None


def make_scheduler(config: Any, log: Any, cells: Sequence[Cell], nics: Sequence[str] | None):
    """A LoadScopeScheduling whose scope is the VM case (the module, for tests without one)."""
    from xdist.scheduler import LoadScopeScheduling

    class CaseScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return case_of(nodeid, cells, nics) or nodeid.split("::", 1)[0]

    return CaseScheduling(config, log)
