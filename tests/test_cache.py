"""Cache publishing is atomic: a failed build leaves nothing; parallel builders build once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from kmodtest.prepare.cache import Cache, default_cache_dir


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
    counter = tmp_path / "count"
    with multiprocessing.get_context("fork").Pool(3) as pool:
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
