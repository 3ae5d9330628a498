"""Every cached artifact is keyed by its inputs plus the code that makes it (prepare/keys.py):
a change to that code, or to an input, gives a new key, never a stale artifact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kmodtest.prepare import images, kernelbuild, keys, ksource, overlay, toolchain
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import load_matrix
from kmodtest.prepare.kernels import kernel_source_for
from kmodtest.prepare.recipes import load_recipe
from kmodtest.prepare.toolchain import KernelPackages
from kmodtest.progress import Progress

REPO = Path(__file__).resolve().parent.parent
KERNEL = KernelPackages("trixie", "amd64", "6.12.1+deb13-amd64", "6.12.1-1")


class Keyed(Exception):
    """Raised instead of building: carries the key the artifact would be cached under."""


@pytest.fixture
def no_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def capture(self: Cache, kind: str, key: str, build: object) -> Path:
        raise Keyed(kind, key)

    monkeypatch.setattr(Cache, "get_or_build", capture)


def _image_key() -> str:
    cell = load_matrix(REPO / "kernels").default
    recipe = load_recipe(REPO / "images", cell.spec.image)
    return images.input_key(recipe, kernel_source_for(cell), cell)


def _keyed(make: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(Keyed) as caught:
        make()
    return caught.value.args


def _toolchain_key(tmp_path: Path) -> str:
    cache, quiet = Cache(tmp_path), Progress(quiet=True)
    return _keyed(lambda: toolchain.get_chroot(cache, KERNEL, ["make"], "t", quiet))[1]


def _sources_key(tmp_path: Path) -> str:
    return _keyed(lambda: ksource.get_sources(Cache(tmp_path), KERNEL, Progress(quiet=True)))[1]


def _overlay_key(tmp_path: Path) -> str:
    return overlay.overlay_key(images.Image(tmp_path / "base"), "change-digest")


ARTIFACTS = {  # artifact -> (its key, a module of the code that makes it)
    "image": (lambda _: _image_key(), "kmodtest.prepare.modules"),
    "toolchain": (_toolchain_key, "kmodtest.prepare.toolchain"),
    "sources": (_sources_key, "kmodtest.prepare.ksource"),
    "overlay (kbuild)": (_overlay_key, "kmodtest.prepare.kbuild"),
    "overlay (toolchain)": (_overlay_key, "kmodtest.prepare.toolchain"),
    "kernel tree": (lambda _: kernelbuild.tree_input_key("trixie"), "kmodtest.prepare.kernelbuild"),
}


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_key_is_stable_and_follows_the_code_that_makes_it(
    artifact, tmp_path, monkeypatch, no_builds
):
    key_of, module = ARTIFACTS[artifact]
    before = key_of(tmp_path)
    assert key_of(tmp_path) == before
    real = keys._module_source
    monkeypatch.setattr(
        keys, "_module_source", lambda name: real(name) + b"#" if name == module else real(name)
    )
    assert key_of(tmp_path) != before, f"{artifact} key ignores {module}"


def test_inputs_change_the_key(tmp_path, no_builds):
    newer = KernelPackages("trixie", "amd64", "6.12.1+deb13-amd64", "6.12.1-2")
    quiet = Progress(quiet=True)
    assert (
        _toolchain_key(tmp_path)
        != _keyed(lambda: toolchain.get_chroot(Cache(tmp_path), newer, ["make"], "t", quiet))[1]
    )
    base = images.Image(tmp_path / "base")
    assert overlay.overlay_key(base, "a") != overlay.overlay_key(base, "b")
    assert kernelbuild.tree_input_key("trixie") != kernelbuild.tree_input_key("sid")


def test_every_named_code_module_exists():
    for code in (images.BUILDER_CODE, toolchain.CHROOT_CODE, overlay.OVERLAY_CODE,
                 kernelbuild.TREE_CODE):  # fmt: skip
        assert len(keys.code_digest(code)) == 64
