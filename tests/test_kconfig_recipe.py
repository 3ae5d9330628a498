"""The suite's kernel fragment builds every module the default router recipe needs.

``kmodtest kernel build`` (the debug cell, users' own trees) compiles tinyconfig plus
:mod:`kmodtest.prepare.kconfig`'s fragment; the image builder then requires each module of
``images/debian-router.yaml``. A module added to the recipe but not to the fragment breaks
only kernels built by kmodtest, after a 7-minute build. This test reads, from trixie's own
Makefiles, which ``CONFIG_*`` option builds each module, and checks the fragment sets it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kmodtest.prepare.cache import Cache, default_cache_dir
from kmodtest.prepare.kconfig import fragment
from kmodtest.prepare.kernelbuild import cached_source_tree
from kmodtest.prepare.recipes import load_recipe

SUITE = "trixie"
REPO = Path(__file__).resolve().parent.parent
# obj-$(CONFIG_NET_IPGRE) += ip_gre.o
_OBJ = re.compile(r"^obj-\$\((CONFIG_\w+)\)\s*[+:]?=\s*(.*)$")
# options without a prompt, set from another one (net/netfilter/Kconfig: def_tristate NFT_REJECT)
DERIVED = {"CONFIG_NFT_REJECT_INET": "CONFIG_NFT_REJECT"}


def module_options(tree: Path) -> dict[str, str]:
    """Module name -> the option that builds it, from the network Makefiles of ``tree``."""
    out: dict[str, str] = {}
    for makefile in [*(tree / "net").rglob("Makefile"), *(tree / "drivers/net").rglob("Makefile")]:
        for line in makefile.read_text(errors="replace").splitlines():
            if m := _OBJ.match(line):
                for word in m[2].split():
                    if word.endswith(".o"):
                        out.setdefault(word[:-2].replace("-", "_"), m[1])
    return out


@pytest.fixture(scope="module")
def options() -> dict[str, str]:
    tree = cached_source_tree(Cache(default_cache_dir()), SUITE)
    if tree is None:
        pytest.skip(f"{SUITE}'s linux-source is not unpacked in the cache: run `kmodtest kernel "
                    f"build --debian-source {SUITE} --out build/{SUITE}-amd64` once")  # fmt: skip
    return module_options(tree)


def test_the_fragment_sets_the_option_of_every_module_the_recipe_needs(options):
    recipe = load_recipe(REPO / "images", "debian-router")
    config = fragment("x86_64").splitlines()
    unknown = [m for m in recipe.spec.modules if m not in options]
    assert unknown == [], f"no Makefile of {SUITE}'s net/ or drivers/net/ builds these"
    wanted = {m: DERIVED.get(options[m], options[m]) for m in recipe.spec.modules}
    missing = {m: o for m, o in wanted.items() if f"{o}=m" not in config and f"{o}=y" not in config}
    assert missing == {}, "add these options to kmodtest/prepare/kconfig.py's COMMON"
