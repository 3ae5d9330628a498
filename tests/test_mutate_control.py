"""The control runs of ``kmodtest mutate`` (no VM: the suite runner is replaced by a recorder).

The first control run times the tests in their collected order; every later one must run in
the order the mutants will (fastest first, from the first run's durations), or a test that
depends on what ran before it passes the controls and then "kills" mutants.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kmodtest.face import mutate
from kmodtest.face.mutsuite import SuiteOutcome
from kmodtest.prepare.cache import Cache


def test_later_control_runs_use_the_mutants_order(tmp_path: Path, monkeypatch):
    orders: list[Path | None] = []

    def fake_run_suite(selection, change, out, timeout, order=None, stop_first=True, cwd=None):
        orders.append(order)
        out.mkdir(parents=True, exist_ok=True)
        return SuiteOutcome("passed", 1.0, passed=3, durations={"t::a": 1.0})

    monkeypatch.setattr(mutate, "run_suite", fake_run_suite)
    durations = tmp_path / "durations.json"
    run = SimpleNamespace(
        cache=Cache(tmp_path / "cache"),
        key=lambda what: f"key-{what}",
        cell=SimpleNamespace(id="cell"),
        selection=None,
        order=None,
    )
    mutate.control(run, 0)  # type: ignore[arg-type]
    run.order = durations  # what mutate_cell sets from the first run
    mutate.control(run, 1)  # type: ignore[arg-type]
    mutate.control(run, 2)  # type: ignore[arg-type]
    assert orders == [None, durations, durations]


def test_a_failing_control_run_stops_with_its_log(tmp_path: Path, monkeypatch):
    def fake_run_suite(selection, change, out, timeout, order=None, stop_first=True, cwd=None):
        out.mkdir(parents=True, exist_ok=True)
        return SuiteOutcome("failed", 1.0, passed=1, failed=1, first_failure="t::b")

    monkeypatch.setattr(mutate, "run_suite", fake_run_suite)
    run = SimpleNamespace(cache=Cache(tmp_path / "cache"), key=lambda what: f"key-{what}",
                          cell=SimpleNamespace(id="cell"), selection=None, order=None)  # fmt: skip
    with pytest.raises(mutate.KmodtestError, match=r"control run 2 failed .*t::b"):
        mutate.control(run, 1)  # type: ignore[arg-type]
