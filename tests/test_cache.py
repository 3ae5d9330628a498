"""Cache publishing is atomic: a failed build leaves nothing; parallel builders build once."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from kmodtest.prepare.cache import BUILD_LOG, Cache, content_problem, default_cache_dir


def test_failed_build_leaves_nothing(tmp_path):
    cache = Cache(tmp_path)

    def broken(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build("images", "k", broken)
    assert not cache.path("images", "k").exists()
    assert list((tmp_path / "images").iterdir()) == []


def _build_once(root: str, counter: str) -> str:
    def build(out: Path) -> None:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.3)
        (out / "artifact").write_text("ok")

    return str(Cache(Path(root)).get_or_build("images", "same", build))


def test_parallel_builders_build_once(tmp_path):
    # spawn, not fork: a fork of a pytest process whose other threads hold a lock can hang
    counter = tmp_path / "count"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.starmap(_build_once, [(str(tmp_path / "c"), str(counter))] * 3)
    assert len(set(paths)) == 1
    assert counter.read_text().count("built") == 1
    assert (Path(paths[0]) / "artifact").read_text() == "ok"


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KMODTEST_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("KMODTEST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kmodtest"


def _counted_build(counter: list[int]):
    def build(out: Path) -> None:
        counter.append(1)
        (out / "initrd.cpio").write_bytes(b"x" * 1000)

    return build


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_damaged_checked_entry_is_discarded_and_rebuilt(tmp_path, damage):
    cache, built = Cache(tmp_path), []
    entry = cache.get_or_build("images", "k", _counted_build(built))
    initrd = entry / "initrd.cpio"
    if damage == "truncate":
        os.truncate(initrd, 10)
    elif damage == "flip":
        initrd.write_bytes(b"y" + b"x" * 999)
    else:
        initrd.unlink()
    assert content_problem(entry) is not None
    assert cache.entry("images", "k") is None  # found at use, discarded: never handed out
    assert cache.get_or_build("images", "k", _counted_build(built)) == entry
    assert len(built) == 2 and content_problem(entry) is None
    assert [line.split()[1] for line in (tmp_path / BUILD_LOG).read_text().splitlines()] == [
        "built", "discarded", "built"
    ]  # fmt: skip
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]


def test_an_entry_without_a_content_manifest_is_not_trusted(tmp_path):
    cache = Cache(tmp_path)
    (tmp_path / "images" / "old").mkdir(parents=True)  # made before entries were checked
    assert cache.entry("images", "old") is None and not (tmp_path / "images" / "old").exists()
