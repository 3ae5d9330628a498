"""Shared helpers for kmodtest's own tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmodtest.lifecycle.case import VmCase
from kmodtest.run import emulator

pytest_plugins = ["pytester", "tests.faults"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def host_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's QEMU for this test, whichever one the run chose (--qemu): for golden values."""
    monkeypatch.setattr(emulator, "_chosen", {})


@pytest.fixture
def inner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let an inner pytest run (pytester) import the repo's fixtures package."""
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


from tests.openwrt_standin import standin, standin_images, standin_server  # noqa: E402, F401


@pytest.fixture
def case(kmodtest_session) -> VmCase:
    """The default cell's first NIC model: the VM case tests of the lifecycle drive by hand."""
    cell = kmodtest_session.cells[0]
    return VmCase(cell, cell.spec.nics[0])
