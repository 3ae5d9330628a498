"""Concurrent builds share one fetch; prune never takes what a running build holds; a failed or
interrupted package fetch leaves no process behind and a log that still exists."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kmodtest.errors import BuildError
from kmodtest.face.cli import main
from kmodtest.prepare import debian, images
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import load_matrix
from kmodtest.progress import Progress

REPO = Path(__file__).resolve().parent.parent


def test_two_builders_of_one_cell_fetch_once(tmp_path, monkeypatch):
    """Two -n 2 workers asking for the same cell's image: one fetches, the other waits."""
    fetches: list[str] = []

    def fetch(suite, arch, packages, workdir, progress, *args):
        fetches.append(str(workdir))
        time.sleep(0.5)  # long enough for the other builder to arrive meanwhile
        (workdir / "root").mkdir()
        return debian.FetchedTree(workdir / "root", {"linux-image-amd64": "1"})

    def assemble(self, cell, recipe, source, tree, work, out):
        (out / "manifest.json").write_text('{"kernel_version": "6.12.0"}')

    monkeypatch.setattr(debian, "fetch", fetch)
    monkeypatch.setattr(images.ImageBuilder, "_assemble", assemble)
    cache = Cache(tmp_path / "cache")
    cell = load_matrix(REPO / "kernels").default
    got: list[Path] = []

    def worker() -> None:
        got.append(images.ImageBuilder(cache, REPO / "images").get(cell).path)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 2 and got[0] == got[1]
    assert len(fetches) == 1, f"fetched {len(fetches)} times: {fetches}"
    assert list((tmp_path / "cache" / "work").iterdir()) == []  # the work dir is gone


def test_prune_keeps_what_a_running_build_holds(tmp_path, capsys):
    """A build in progress (real get_or_build, paused mid-build): prune --all leaves its
    temporary and its work directory alone, and the build then publishes normally."""
    cache = Cache(tmp_path / "cache")
    building, release = threading.Event(), threading.Event()
    result: list[Path] = []

    def build(out: Path) -> None:
        (out / "half").write_text("x")
        building.set()
        release.wait(30)

    def run() -> None:
        with cache.workdir(prefix="debian-trixie-amd64.") as work:
            (work / "packages.tar").write_text("x")
            result.append(cache.get_or_build("images", "k1", build))

    thread = threading.Thread(target=run)
    thread.start()
    assert building.wait(30)
    held = [*(cache.root / "images").iterdir(), *(cache.root / "work").iterdir()]
    assert len(held) == 2
    dirs = [f"--kernels-dir={REPO / 'kernels'}", f"--images-dir={REPO / 'images'}"]
    try:
        assert main(["cache", "prune", "--all", f"--image-cache={cache.root}", *dirs]) == 0
        assert all(p.exists() for p in held), "prune removed an entry a build holds"
        out = capsys.readouterr().out
        assert out.count("a running build holds it") == 2, out
    finally:
        release.set()
        thread.join(30)
    assert result == [cache.root / "images" / "k1"] and (result[0] / "half").exists()
    assert main(["cache", "prune", "--all", f"--image-cache={cache.root}", *dirs]) == 0
    assert not (cache.root / "images" / "k1").exists()  # free again: prune takes it


def _fake_mmdebstrap(bindir: Path, body: str) -> None:
    """A stand-in for mmdebstrap on PATH: the process handling around it is what is tested."""
    bindir.mkdir()
    tool = bindir / "mmdebstrap"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)


def test_failed_fetch_points_at_a_log_that_still_exists(tmp_path, monkeypatch):
    _fake_mmdebstrap(tmp_path / "bin", 'echo "E: Unable to locate package nosuch"; exit 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cache = Cache(tmp_path / "cache")
    with pytest.raises(BuildError) as caught, cache.workdir(prefix="x.") as work:
        debian.fetch("trixie", "amd64", ["nosuch"], work, Progress(quiet=True))
    assert not any((tmp_path / "cache" / "work").iterdir())  # the work dir is gone ...
    log = Path(str(caught.value).split("Full log: ")[1].split()[0])
    assert log.is_file(), f"the error points at {log}, which does not exist"  # ... the log not
    assert "Unable to locate package nosuch" in log.read_text()
    assert log.stat().st_mode & 0o077 == 0
    log.unlink()


def test_interrupted_fetch_kills_mmdebstrap_and_its_children(tmp_path, monkeypatch):
    pidfile = tmp_path / "apt.pid"
    _fake_mmdebstrap(
        tmp_path / "bin", f"sleep 300 & echo $! >{pidfile}; echo fetching; wait"
    )  # like mmdebstrap running apt
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    class Interrupting(Progress):
        def detail(self, text: str) -> None:
            raise KeyboardInterrupt  # Ctrl-C while mmdebstrap runs

    with pytest.raises(KeyboardInterrupt):
        debian.fetch("trixie", "amd64", ["x"], tmp_path, Interrupting(quiet=True))
    apt = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{apt}").exists() and "Z" not in _state(apt):
        assert time.monotonic() < deadline, "mmdebstrap's child survived the interrupt"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
