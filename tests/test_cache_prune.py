"""``kmodtest cache prune`` removes what the current matrix no longer points to, nothing else."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kmodtest.face.cli import main
from kmodtest.prepare.cache import Cache, write_content_manifest
from kmodtest.prepare.cells import load_matrix
from kmodtest.prepare.images import input_key
from kmodtest.prepare.kernels import kernel_source_for
from kmodtest.prepare.recipes import load_recipe

REPO = Path(__file__).resolve().parent.parent


def _fill(root: Path) -> dict[str, Path]:
    cell = load_matrix(REPO / "kernels").default
    key = input_key(load_recipe(REPO / "images", cell.spec.image), kernel_source_for(cell), cell)
    paths = {
        "live_index": root / "index" / f"{key}.json",
        "live_image": root / "images" / "aaaa",
        "old_index": root / "index" / "0123456789abcdef0123.json",
        "old_image": root / "images" / "bbbb",
        "half_built": root / "images" / ".cccc.tmp",
        "work": root / "work" / "debian-trixie-amd64.x1",
        "sources": root / "sources" / "dddd",
    }
    for name, path in paths.items():
        if path.suffix == ".json":
            path.parent.mkdir(parents=True, exist_ok=True)
            image = "aaaa" if name == "live_index" else "bbbb"
            path.write_text(json.dumps({"image": image}))
        else:
            path.mkdir(parents=True)
            (path / "blob").write_bytes(b"x" * 1000)
    return paths


def _cli(root: Path, *args: str) -> int:
    dirs = [f"--kernels-dir={REPO / 'kernels'}", f"--images-dir={REPO / 'images'}"]
    return main(["cache", *args, f"--image-cache={root}", *dirs])


def test_prune_keeps_what_the_matrix_uses(tmp_path, capsys):
    paths = _fill(tmp_path)
    assert _cli(tmp_path, "prune", "--dry-run") == 0
    assert all(p.exists() for p in paths.values())
    assert "would remove 4 entries" in capsys.readouterr().out

    assert _cli(tmp_path, "prune") == 0
    kept = {name for name, p in paths.items() if p.exists()}
    assert kept == {"live_index", "live_image", "sources"}


def test_prune_kind_and_all(tmp_path):
    paths = _fill(tmp_path)
    assert _cli(tmp_path, "prune", "--kind", "sources") == 0
    assert not paths["sources"].exists() and paths["live_image"].exists()
    assert _cli(tmp_path, "prune", "--all") == 0
    assert not any(p.exists() for p in paths.values())


def test_list_prints_sizes(tmp_path, capsys):
    _fill(tmp_path)
    assert _cli(tmp_path) == 0
    out = capsys.readouterr().out
    assert "images" in out and "prune` frees" in out


def test_prune_unused_for_removes_what_no_run_built_or_used_lately(tmp_path, capsys):
    paths = _fill(tmp_path)
    write_content_manifest(paths["live_image"])  # images are checked before they are served
    month_ago = time.time() - 30 * 86400
    for name in ("live_image", "sources", "old_index"):
        os.utime(paths[name], (month_ago, month_ago))
    # a run is served the live image: that counts as a use, so it stays
    assert Cache(tmp_path).entry("images", paths["live_image"].name) == paths["live_image"]

    assert _cli(tmp_path, "prune", "--unused-for", "14") == 0
    kept = {name for name, p in paths.items() if p.exists()}
    # sources: a month unused; old_index, old_image, half_built, work: stale as before
    assert kept == {"live_index", "live_image"}


def test_prune_unused_for_takes_only_a_number_of_days(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(tmp_path, "prune", "--unused-for", "a fortnight")
    assert "is not a number of days" in capsys.readouterr().err
