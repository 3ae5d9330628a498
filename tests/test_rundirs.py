"""Run roots: removed whole when the run ends, except a kept lab, which stays where its QEMU
bound its sockets until it is released."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodtest.errors import MachineError
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


def test_a_run_that_boots_nothing_makes_no_run_root(tmp_path: Path) -> None:
    """pytest with kmodtest's plugin loaded, on a test that never asks for a VM: no run root
    appears in the temp dir, not even while the run lasts (the first lab makes it)."""
    project, scratch = tmp_path / "project", tmp_path / "tmp"
    project.mkdir()
    scratch.mkdir()
    (project / "test_plain.py").write_text(
        "import tempfile\n"
        "from pathlib import Path\n\n"
        "def test_plain(request):\n"
        "    assert request.config.pluginmanager.has_plugin('kmodtest')\n"
        "    assert list(Path(tempfile.gettempdir()).iterdir()) == []\n"
    )
    env = {**os.environ, "TMPDIR": str(scratch)}
    env.pop(rundirs.RUN_ROOT_ENV, None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(scratch.iterdir()) == []


def test_the_first_lab_makes_the_root_a_worker_files_into(own_run: Path) -> None:
    """The controller only names its root; a worker (same name from the environment) makes
    it with its first lab and leaves it for the controller to remove."""
    assert not own_run.exists()
    rundirs._own_root = None  # now as an xdist worker of that controller
    assert rundirs.start_run(worker=True) == own_run
    lab = rundirs.new_lab_dir()
    assert lab.parent == own_run and (own_run.stat().st_mode & 0o777) == 0o700
    rundirs.end_run()  # the worker ends: not its root to remove
    assert lab.is_dir()
    rundirs._own_root = own_run  # the controller ends
    rundirs.end_run()
    assert not own_run.exists()


def test_a_root_name_taken_by_someone_else_is_refused(own_run: Path, tmp_path: Path) -> None:
    """The temp dir is shared: a symlink planted at the run root's name is never followed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    own_run.symlink_to(elsewhere)
    with pytest.raises(MachineError, match="not a private directory of ours"):
        rundirs.new_lab_dir()
    assert list(elsewhere.iterdir()) == []
    own_run.unlink()


def test_xdist_workers_make_their_labs_in_the_controllers_root(tmp_path: Path) -> None:
    """``-n 2``: the first worker to need a lab makes the root the controller named, the other
    files into it too, and the controller removes it at the end (a root per worker would be
    left behind by a worker its controller kills)."""
    project, scratch, seen = tmp_path / "project", tmp_path / "tmp", tmp_path / "seen"
    for directory in (project, scratch, seen):
        directory.mkdir()
    (project / "test_labs.py").write_text(
        "import os, pytest\n"
        "from pathlib import Path\n"
        "from kmodtest.run import rundirs\n\n"
        "@pytest.mark.parametrize('n', range(4))\n"
        "def test_lab(n):\n"
        "    lab = rundirs.new_lab_dir()\n"
        "    worker = os.environ['PYTEST_XDIST_WORKER']\n"
        "    (Path(os.environ['SEEN']) / f'{worker}-{n}').write_text(str(lab))\n"
    )
    env = {**os.environ, "TMPDIR": str(scratch), "SEEN": str(seen)}
    env.pop(rundirs.RUN_ROOT_ENV, None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "-p",
         "no:randomly", str(project)],
        cwd=project, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    labs = [Path(p.read_text()) for p in seen.iterdir()]
    assert len(labs) == 4 and len({p.name.split("-")[0] for p in seen.iterdir()}) == 2
    assert {lab.parent for lab in labs} == {scratch / labs[0].parent.name}
    assert labs[0].parent.name.startswith("kt-")
    assert list(scratch.glob("kt-*")) == []  # (xdist leaves pytest's own basetemp there)
