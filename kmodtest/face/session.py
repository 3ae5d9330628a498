"""Per-run state shared by the plugin and the fixtures: the selected cells and the lab pool."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kmodtest.face.kept import KeptVm
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import Cell, Matrix
from kmodtest.run.emulator import QemuChoice


@dataclass
class KmodtestSession:
    matrix: Matrix
    cells: list[Cell]
    cache: Cache
    pool: RouterPool
    log_root: Path
    keep_logs: bool
    skips: dict[str, str] = field(default_factory=dict)  # cell id -> why it cannot run here
    # (cell id, NIC model) -> why that NIC cannot run here (e.g. igb before QEMU 8.0)
    nic_skips: dict[tuple[str, str], str] = field(default_factory=dict)
    keep_on_failure: bool = False  # --keep-vm-on-failure: the first failing test's VM stays
    kept: list[KeptVm] = field(default_factory=list)
    qemu: list[QemuChoice] = field(default_factory=list)  # which QEMU each arch runs on

    def finish(self, failed: bool) -> list[str]:
        """Stop every lab; kernel problems found outside any test. Logs stay when anything
        failed (or with --keep-logs)."""
        problems = self.pool.close()
        if not (failed or problems or self.keep_logs):
            shutil.rmtree(self.log_root, ignore_errors=True)
        return problems
