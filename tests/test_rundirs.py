"""Run roots: removed whole when the run ends, except a kept lab, which stays where its QEMU
bound its sockets until it is released."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodtest.run import rundirs


@pytest.fixture
def own_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(rundirs, "_own_root", None)
    monkeypatch.delenv(rundirs.RUN_ROOT_ENV, raising=False)
    root = rundirs.start_run()
    yield root
    rundirs.end_run()


def test_the_run_root_goes_with_its_labs(own_run: Path) -> None:
    labs = [rundirs.new_lab_dir(), rundirs.new_lab_dir()]
    (labs[0] / "agent.sock").touch()
    assert all(lab.parent == own_run for lab in labs)
    rundirs.end_run()
    assert not own_run.exists()


def test_a_kept_lab_outlives_its_run_until_released(own_run: Path) -> None:
    kept, other = rundirs.new_lab_dir(), rundirs.new_lab_dir()
    (kept / "agent.sock").touch()
    rundirs.keep_lab_dir(kept)
    rundirs.end_run()
    assert (kept / "agent.sock").exists() and not other.exists()  # same path: nothing moved
    rundirs.release_lab_dir(kept)
    assert not own_run.exists()


def test_releasing_one_kept_lab_keeps_the_root_of_another(own_run: Path) -> None:
    first, second = rundirs.new_lab_dir(), rundirs.new_lab_dir()
    rundirs.keep_lab_dir(first)
    rundirs.keep_lab_dir(second)
    rundirs.end_run()
    rundirs.release_lab_dir(first)
    assert second.is_dir()
    rundirs.release_lab_dir(second)
    assert not own_run.exists()
