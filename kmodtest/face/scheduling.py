"""Under ``pytest -n N``: the work unit is one test module on one VM case (cell + NIC model),
handed out in the run's order, so the workers go through a case's modules side by side.

Each worker runs its own VM of the case: a restore of the case's saved state (about 0.5 s to
ready; the first of a run builds it, the other waits for it), where one worker per case used to
leave a core idle whenever fewer cases than workers were left (3 NIC models on 2 cores: the last
case ran alone). The order is kept (xdist's ``--loadscope-reorder`` would hand out the biggest
units first, mixing cases: a restore at every switch), so a worker changes case about once per
case. Tests keep their order within a module. This is an xdist scheduler
(``pytest_xdist_make_scheduler``) rather than ``xdist_group`` marks: with pytest 9 the marks no
longer reach the node ids xdist groups by (it rewrites ``item._nodeid``, which pytest 9 no
longer reads).
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


def work_unit_of(
    nodeid: str, cells: Sequence[Cell], nics: Sequence[str] | None, split_cases: bool = True
) -> str:
    """``<case>::<module>`` of a VM test (``<case>`` alone unless ``split_cases``); the
    module of a test without a VM."""
    module = nodeid.split("::", 1)[0]
    case = case_of(nodeid, cells, nics)
    if not case:
        return module
    return f"{case}::{module}" if split_cases else case


def make_scheduler(
    config: Any,
    log: Any,
    cells: Sequence[Cell],
    nics: Sequence[str] | None,
    split_cases: bool = True,
):
    """A LoadScopeScheduling whose scope is a module on a VM case, in the run's order.

    ``split_cases=False`` (VMs boot cold: no saved states, or a module change whose image is
    new) keeps each case on one worker: a second worker would pay a whole boot for it."""
    from xdist.scheduler import LoadScopeScheduling

    class CaseModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit_of(nodeid, cells, nics, split_cases)

        def schedule(self) -> None:
            reorder = self.config.option.loadscopereorder
            self.config.option.loadscopereorder = False  # see the module's docstring
            try:
                super().schedule()
            finally:
                self.config.option.loadscopereorder = reorder

    return CaseModuleScheduling(config, log)
