"""images/*.yaml recipes: the real one loads; bad ones fail with file and line."""

from __future__ import annotations

import pytest

from kmodtest import flowtable
from kmodtest.errors import ConfigError
from kmodtest.prepare.recipes import load_recipe


def test_default_recipe_has_the_tools_and_modules_the_suite_needs(repo):
    recipe = load_recipe(repo / "images", "debian-router")
    for package in ("busybox-static", "nftables", "conntrack", "iproute2", "kmod"):
        assert package in recipe.spec.packages
    for module in flowtable.MODULES:
        assert module in recipe.spec.modules


def test_digest_follows_content(tmp_path):
    (tmp_path / "r.yaml").write_text("packages: [a]\n")
    first = load_recipe(tmp_path, "r").digest()
    (tmp_path / "r.yaml").write_text("packages: [a, b]\n")
    assert load_recipe(tmp_path, "r").digest() != first


def test_malformed_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("packages: [a]\nmodules: nft_flow_offload: x\n")
    with pytest.raises(ConfigError, match=r"r.yaml:2: malformed YAML"):
        load_recipe(tmp_path, "r")


def test_recipe_with_wrong_type_and_unknown_key(tmp_path):
    (tmp_path / "r.yaml").write_text("packages: []\nmoduls: [x]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path, "r")
    assert "r.yaml:1: packages" in str(err.value)
    assert "r.yaml:2: moduls: Extra inputs are not permitted" in str(err.value)


def test_unknown_recipe_lists_known_ones(repo):
    with pytest.raises(ConfigError, match="use one of: debian-router"):
        load_recipe(repo / "images", "nope")
