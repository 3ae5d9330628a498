"""The image cache key covers everything that shapes an image, including the builder's code."""

from __future__ import annotations

from pathlib import Path

from kmodtest.prepare import images
from kmodtest.prepare.cells import load_matrix
from kmodtest.prepare.kernels import kernel_source_for
from kmodtest.prepare.recipes import load_recipe

REPO = Path(__file__).resolve().parent.parent


def _key() -> str:
    cell = load_matrix(REPO / "kernels").default
    recipe = load_recipe(REPO / "images", cell.spec.image)
    return images.input_key(recipe, kernel_source_for(cell), cell)


def test_key_is_stable_for_the_same_inputs():
    assert _key() == _key()


def test_a_change_to_the_builder_code_changes_the_key(monkeypatch):
    before = _key()
    monkeypatch.setattr(images, "builder_digest", lambda: "another builder")
    assert _key() != before


def test_builder_digest_covers_the_builder_modules():
    assert len(images.builder_digest()) == 64
    for name in images.BUILDER_MODULES:
        assert (REPO / "kmodtest" / "prepare" / name).is_file(), name
